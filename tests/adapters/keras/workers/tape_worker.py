"""A GradientTape training loop for the kill tests: saves after every step until it is killed.

Usage: ``python tape_worker.py ROOT``. A ``tf.Module`` with momentum buffers and a Keras
Dropout layer inside (its seed state is not in TensorFlow's trackable graph), dropout also
drawn from a ``tf.random.Generator``, inputs from another, and targets' noise from a shuffled,
repeated ``tf.data`` iterator, all in a ``TFState`` checkpointed by the core ``Checkpointer``.
Prints ``resumed N``, ``saved N`` per step and ``digest HEX``.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import tensorflow as tf

from ckptkit import Checkpointer, CheckpointStore
from ckptkit.adapters.keras import TFState

STEPS = 12


class Net(tf.Module):
    """Two dense blocks, their momentum buffers and a Keras Dropout layer."""

    def __init__(self) -> None:
        super().__init__()
        init = tf.random.Generator.from_seed(0)
        self.w1 = tf.Variable(init.normal((3, 16)))
        self.w2 = tf.Variable(init.normal((16, 1)))
        self.velocity = [tf.Variable(tf.zeros_like(w)) for w in (self.w1, self.w2)]
        self.drop = keras.layers.Dropout(0.3, seed=9)


def train_step(
    net: Net, noise: tf.random.Generator, data: tf.random.Generator, it: Iterator[tf.Tensor]
) -> None:
    x = data.normal((32, 3))
    y = tf.reduce_sum(x, axis=1, keepdims=True) + 0.1 * next(it)
    with tf.GradientTape() as tape:
        h = tf.nn.relu(x @ net.w1)
        h = h * tf.cast(noise.uniform(tf.shape(h)) > 0.2, h.dtype)
        h = net.drop(h, training=True)
        loss = tf.reduce_mean((h @ net.w2 - y) ** 2)
    params = [net.w1, net.w2]
    for p, v, g in zip(params, net.velocity, tape.gradient(loss, params), strict=True):
        v.assign(0.9 * v + g)
        p.assign_sub(0.01 * v)


def main() -> None:
    net = Net()
    noise, data = tf.random.Generator.from_seed(1), tf.random.Generator.from_seed(2)
    pool = tf.random.Generator.from_seed(3).normal((40, 1))
    it = iter(tf.data.Dataset.from_tensor_slices(pool).shuffle(40, seed=4).repeat().batch(32))
    state = TFState(net=net, noise=noise, data=data, it=it)
    ckpt = Checkpointer(CheckpointStore(sys.argv[1], keep_last=2), None, state)
    start = ckpt.resume()
    print(f"resumed {start}", flush=True)
    for step in range(start, STEPS):
        train_step(net, noise, data, it)
        ckpt.step(step)
        print(f"saved {step}", flush=True)
    digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in net.variables)).hexdigest()
    print(f"digest {digest}", flush=True)


if __name__ == "__main__":
    main()

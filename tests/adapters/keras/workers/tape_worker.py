"""A GradientTape training loop for the kill tests: saves after every step until it is killed.

Usage: ``python tape_worker.py ROOT``. A ``tf.Module`` with momentum buffers, dropout drawn
from one ``tf.random.Generator`` and data from another, all in a ``TFState`` checkpointed by
the core ``Checkpointer``. Prints ``resumed N``, ``saved N`` per step and ``digest HEX``.
"""

from __future__ import annotations

import hashlib
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf

from ckptkit import Checkpointer, CheckpointStore
from ckptkit.adapters.keras import TFState

STEPS = 12


class Net(tf.Module):
    """Two dense blocks and their momentum buffers."""

    def __init__(self) -> None:
        super().__init__()
        init = tf.random.Generator.from_seed(0)
        self.w1 = tf.Variable(init.normal((3, 16)))
        self.w2 = tf.Variable(init.normal((16, 1)))
        self.velocity = [tf.Variable(tf.zeros_like(w)) for w in (self.w1, self.w2)]


def train_step(net: Net, noise: tf.random.Generator, data: tf.random.Generator) -> None:
    x = data.normal((32, 3))
    y = tf.reduce_sum(x, axis=1, keepdims=True)
    with tf.GradientTape() as tape:
        h = tf.nn.relu(x @ net.w1)
        h = h * tf.cast(noise.uniform(tf.shape(h)) > 0.2, h.dtype)
        loss = tf.reduce_mean((h @ net.w2 - y) ** 2)
    params = [net.w1, net.w2]
    for p, v, g in zip(params, net.velocity, tape.gradient(loss, params), strict=True):
        v.assign(0.9 * v + g)
        p.assign_sub(0.01 * v)


def main() -> None:
    net = Net()
    noise, data = tf.random.Generator.from_seed(1), tf.random.Generator.from_seed(2)
    ckpt = Checkpointer(
        CheckpointStore(sys.argv[1], keep_last=2), None, TFState(net=net, noise=noise, data=data)
    )
    start = ckpt.resume()
    print(f"resumed {start}", flush=True)
    for step in range(start, STEPS):
        train_step(net, noise, data)
        ckpt.step(step)
        print(f"saved {step}", flush=True)
    digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in net.variables)).hexdigest()
    print(f"digest {digest}", flush=True)


if __name__ == "__main__":
    main()

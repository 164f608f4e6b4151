"""Recognise framework objects (PyTorch, Keras, TensorFlow) by name, to point at their adapter.

The core never imports a framework, so it tells their objects by the modules their classes are
defined in. This only shapes error messages: a model handed to the core directly fails with the
adapter to wrap it in, instead of a puzzling "unsupported type Tensor" deep inside a save.
"""

from __future__ import annotations

#: The keyword a framework object usually gets in the adapter's state, by its base class name.
_PART_NAMES = {
    "Module": "model",
    "Optimizer": "optimizer",
    "LRScheduler": "scheduler",
    "_LRScheduler": "scheduler",
    "ReduceLROnPlateau": "scheduler",
    "GradScaler": "scaler",
    "Generator": "generator",
    "Model": "model",
    "Layer": "model",
}


def framework_of(value: object) -> str | None:
    """``"torch"``, ``"keras"`` (Keras or TensorFlow) or None, by the value's class hierarchy."""
    for cls in type(value).__mro__:
        top = cls.__module__.split(".", 1)[0]
        if top == "torch":
            return "torch"
        if top in ("keras", "tensorflow", "tf_keras"):
            return "keras"
    return None


def part_name(value: object) -> str:
    """The keyword an adapter state would give ``value``: ``model``, ``optimizer``, ..."""
    for cls in type(value).__mro__:
        if cls.__module__.split(".", 1)[0] in ("torch", "keras", "tensorflow", "tf_keras"):
            name = _PART_NAMES.get(cls.__name__)
            if name is not None:
                return name
    return "obj"


def uses_framework_state_dict(value: object) -> bool:
    """True if ``value.state_dict`` is a framework's own, which returns framework tensors.

    A class of the user's that derives from ``torch.nn.Module`` but defines its own
    ``state_dict`` (returning numpy arrays, say) is not flagged.
    """
    for cls in type(value).__mro__:
        if "state_dict" in vars(cls):
            return cls.__module__.split(".", 1)[0] == "torch"
    return False


def adapter_hint(parts: dict[str, object]) -> str:
    """How to wrap these named framework objects in their adapter's state (one framework)."""
    frameworks = {framework_of(v) for v in parts.values()} - {None}
    args = ", ".join(f"{name}={name}" for name in parts)
    if frameworks == {"torch"}:
        return (
            f"wrap it in the torch adapter's state: TorchState({args}) from ckptkit.adapters.torch"
        )
    return (
        f"wrap it in the Keras adapter's state: KerasState({args}) from ckptkit.adapters.keras "
        "(TFState for tf.Module and tf.random.Generator objects; with model.fit, use its "
        "CheckpointCallback instead)"
    )


def leaf_hint(value: object) -> str | None:
    """For a framework value found in a state tree: which adapter converts it; else None."""
    framework = framework_of(value)
    if framework == "torch":
        return (
            "a PyTorch value: convert torch state with ckptkit.adapters.torch (TorchState(model=..., "
            "optimizer=...) for a Checkpointer, state_to_tree(obj) for store.save)"
        )
    if framework == "keras":
        return (
            "a Keras/TensorFlow value: convert it with ckptkit.adapters.keras (KerasState(model=...) "
            "for a Checkpointer, state_to_tree(obj) for store.save)"
        )
    return None


def refuse_framework_objects(parts: dict[str, object], *, where: str | None) -> None:
    """Refuse a framework's model, optimizer... given directly, naming the adapter to wrap it in.

    Their state dicts hold framework tensors, which the core cannot save: without this, the
    first save would fail deep inside with "unsupported type Tensor".
    """
    found = {
        name: obj
        for name, obj in parts.items()
        if framework_of(obj) is not None
        and (uses_framework_state_dict(obj) or not callable(getattr(obj, "state_dict", None)))
    }
    if not found:
        return
    name, obj = next(iter(found.items()))
    what = "state" if where is None else f"{where}[{name!r}]"
    framework = "PyTorch" if framework_of(obj) == "torch" else "Keras/TensorFlow"
    raise TypeError(
        f"{what} is a {framework} {type(obj).__name__}, which the core cannot save directly "
        f"(its state holds framework tensors); {adapter_hint(found if where else parts)}, and "
        "pass that to the Checkpointer"
    )

"""Swap the dropout layers of an existing model (timm, sentence-transformers, your own) and swap them back."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from ml_optim_plugins.regularization.gaussian_dropout import GaussianDropout


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


class DropoutReplacement:
    """What :func:`replace_dropout` swapped: ``{name: (original, replacement)}``; :meth:`undo` puts the originals back.

    Also a context manager: the originals come back when the ``with`` block ends.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2))
        >>> with replace_dropout(model) as replaced:
        ...     replaced.names, type(model[1]).__name__
        (['1'], 'GaussianDropout')
        >>> type(model[1]).__name__
        'Dropout'
    """

    def __init__(self, root: nn.Module, swapped: dict[str, tuple[nn.Module, nn.Module]]) -> None:
        self.root = root
        self.swapped = swapped

    @property
    def names(self) -> list[str]:
        """Qualified names of the replaced layers."""
        return list(self.swapped)

    def __len__(self) -> int:
        return len(self.swapped)

    def undo(self) -> None:
        """Put every original layer back where it was (idempotent)."""
        for name, (original, _) in self.swapped.items():
            _set_submodule(self.root, name, original)
        self.swapped = {}

    def not_called(self, run: Callable[[], Any]) -> list[str]:
        """Names of replaced layers that ``run()`` (a training-mode forward pass) never calls.

        Some models do not call their dropout module but read its rate: transformers' BERT and timm's ViT pass
        ``attn_drop.p`` to a fused attention kernel, which then applies Bernoulli dropout on the attention
        probabilities. Those layers keep their rate but not the Gaussian noise; this finds them.
        """
        called: set[str] = set()
        handles = [
            replacement.register_forward_hook(lambda *_, name=name: called.add(name))
            for name, (_, replacement) in self.swapped.items()
        ]
        try:
            run()
        finally:
            for handle in handles:
                handle.remove()
        return [name for name in self.swapped if name not in called]

    def __enter__(self) -> DropoutReplacement:
        return self

    def __exit__(self, *exc: object) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"DropoutReplacement({len(self)} layers: {', '.join(self.names[:4])}{', ...' if len(self) > 4 else ''})"


def replace_dropout(
    module: nn.Module,
    factory: Callable[[float], nn.Module] = GaussianDropout,
    types: Sequence[type[nn.Module]] = (nn.Dropout,),
    exclude: Iterable[str] = (),
) -> DropoutReplacement:
    """Replace every dropout layer of ``module`` by ``factory(p)`` with the same rate ``p``, in place.

    Args:
        module: any model, e.g. a timm model or a sentence-transformer.
        factory: builds the replacement from the original's rate; default :class:`GaussianDropout`.
        types: layer classes to replace (exact ``nn.Dropout`` by default; add ``nn.Dropout2d`` with a factory such as
            ``lambda p: GaussianDropout(p, shared_dims=(2, 3))`` for channel dropout).
        exclude: names or globs of layers to leave alone (e.g. ``"*.attention.*"``).

    Returns:
        A :class:`DropoutReplacement`: the names replaced, ``undo()``, ``not_called(run)``; usable as a context
        manager.

    Example:
        >>> import timm
        >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, drop_rate=0.1, proj_drop_rate=0.1)
        >>> replaced = replace_dropout(model)
        >>> len(replaced), type(model.blocks[0].mlp.drop1).__name__, model.blocks[0].mlp.drop1.p
        (50, 'GaussianDropout', 0.1)
        >>> replaced.undo()
        >>> type(model.blocks[0].mlp.drop1).__name__
        'Dropout'
    """
    patterns = list(exclude)
    targets = [
        (name, child)
        for name, child in module.named_modules(remove_duplicate=False)
        if name and type(child) in tuple(types) and not any(fnmatchcase(name, pattern) for pattern in patterns)
    ]
    swapped: dict[str, tuple[nn.Module, nn.Module]] = {}
    replacements: dict[int, nn.Module] = {}  # a layer shared by two parents gets one shared replacement
    for name, original in targets:
        if id(original) not in replacements:
            replacements[id(original)] = factory(original.p)
            replacements[id(original)].train(original.training)
        _set_submodule(module, name, replacements[id(original)])
        swapped[name] = (original, replacements[id(original)])
    return DropoutReplacement(module, swapped)

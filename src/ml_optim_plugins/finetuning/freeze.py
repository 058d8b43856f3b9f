"""Freezing helpers: parameters that take no gradient, and the frozen modules that stay in ``eval()``.

In the spirit of the static helpers of Lightning's ``BaseFinetuning`` (``freeze``, ``make_trainable``), but per
parameter (a stage may unfreeze the top blocks of an encoder) and with frozen modules kept in ``eval()`` (BatchNorm
statistics fixed, dropout off) rather than left to the model's mode.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from torch import nn

# torch's public batch norms (its private _BatchNorm base adds only the quantized ones, which do not train); timm's
# BatchNormAct2d and the like subclass these.
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LazyBatchNorm1d,
               nn.LazyBatchNorm2d, nn.LazyBatchNorm3d)


def freeze(params: Iterable[nn.Parameter]) -> None:
    """Stop ``params`` from training: ``requires_grad=False`` and no gradient, so the optimizer skips them.

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> freeze(layer.parameters())
        >>> [p.requires_grad for p in layer.parameters()]
        [False, False]
    """
    for p in params:
        p.requires_grad_(False)
        p.grad = None


def make_trainable(params: Iterable[nn.Parameter]) -> None:
    """Let ``params`` train again (``requires_grad=True``).

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> freeze(layer.parameters()); make_trainable([layer.bias])
        >>> layer.weight.requires_grad, layer.bias.requires_grad
        (False, True)
    """
    for p in params:
        p.requires_grad_(True)


def batchnorm_parameters(module: nn.Module) -> set[int]:
    """``id()`` of the parameters of the BatchNorm layers in ``module`` (they follow ``Stage(train_bn=...)``).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
        >>> batchnorm_parameters(model) == {id(model[1].weight), id(model[1].bias)}
        True
    """
    return {id(p) for m in module.modules() if isinstance(m, BATCH_NORMS) for p in m.parameters()}


def frozen_modules(module: nn.Module, frozen: Collection[int]) -> list[nn.Module]:
    """The largest sub-modules of ``module`` (itself included) whose parameters are all in ``frozen`` (``id()`` s).

    These are the modules to keep in ``eval()``: a module with a trainable parameter follows the model's mode, and
    one without parameters (an activation, a pooling) is inside a frozen module or stays as it is.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Dropout(), nn.Linear(2, 2)), nn.Linear(2, 1))
        >>> chosen = frozen_modules(model, {id(p) for p in model[1].parameters()})
        >>> chosen == [model[1]]
        True
    """
    chosen: list[nn.Module] = []
    covered: set[int] = set()
    for _, sub in module.named_modules():
        if id(sub) in covered:
            continue
        ids = {id(p) for p in sub.parameters()}
        if ids and ids <= frozen:
            chosen.append(sub)
            covered.update(id(m) for m in sub.modules())
    return chosen


def keep_in_eval(modules: Iterable[nn.Module]) -> None:
    """Put each module back in ``eval()`` if something (Lightning at each epoch start) switched it to train mode.

    Example:
        >>> frozen = nn.Dropout()
        >>> keep_in_eval([frozen]); frozen.training
        False
    """
    for module in modules:
        if module.training:
            module.eval()


class FrozenModules:
    """One stage's frozen set at a time: managed parameters outside it frozen, those inside trainable, and the modules
    whose parameters are all frozen kept in ``eval()``; a module that is unfrozen follows the model's mode again.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.Linear(2, 1))
        >>> params = {id(p): p for p in model.parameters()}
        >>> first = {id(p) for p in model[0].parameters()}
        >>> frozen = FrozenModules()
        >>> frozen.apply(model, params, managed=first, trainable=set())
        >>> model[0].weight.requires_grad, model[0].training, model[2].training
        (False, False, True)
        >>> frozen.apply(model, params, managed=first, trainable=first)
        >>> model[0].weight.requires_grad, model[0].training
        (True, True)
    """

    def __init__(self) -> None:
        self.modules: list[nn.Module] = []

    def apply(
        self,
        model: nn.Module,
        params: Mapping[int, nn.Parameter],
        managed: Collection[int],
        trainable: Collection[int],
        extra: Iterable[nn.Module] = (),
        set_modes: bool = True,
    ) -> None:
        """Freeze the ``managed`` parameters (``id()`` s in ``params``) outside ``trainable`` and unfreeze those in it.
        With ``set_modes``, the previously frozen modules take ``model``'s mode and the newly frozen ones (and
        ``extra``, e.g. an activation cache's lower blocks) are put in ``eval()``."""
        frozen = set(managed) - set(trainable)
        freeze(params[p] for p in frozen)
        make_trainable(params[p] for p in set(managed) & set(trainable))
        previous, self.modules = self.modules, frozen_modules(model, frozen) + list(extra)
        if set_modes:
            for module in previous:
                module.train(model.training)
            self.keep_in_eval()

    def keep_in_eval(self) -> None:
        """Put the frozen modules back in ``eval()`` (:func:`keep_in_eval`)."""
        keep_in_eval(self.modules)

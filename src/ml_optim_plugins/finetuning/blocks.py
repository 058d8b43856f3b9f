"""Block structure of encoders, and the selectors stages use to name parts of a model ("text[-2:]")."""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import nn

from ml_optim_plugins.multimodal.contract import ModelWrapper
from ml_optim_plugins.names import name_matches

_SELECTOR = re.compile(r"^(?P<target>[^\[\]]+?)\s*(?:\[(?P<index>\s*-?\d*\s*(?::\s*-?\d*\s*)?)\])?$")


def _prefixed(prefix: str, blocks: list[list[str]]) -> list[list[str]]:
    return [[prefix + name for name in block] for block in blocks]


def _timm_blocks(model: nn.Module) -> list[list[str]] | None:
    """timm's own coarse grouping (the one its layer-wise LR decay uses): stem, each stage or block, head."""
    matcher = getattr(model, "group_matcher", None)
    if not callable(matcher):
        return None
    from timm.models import group_parameters

    try:
        groups = group_parameters(model, matcher(coarse=True))
    except (NotImplementedError, TypeError, AttributeError):
        return None
    return [list(groups[key]) for key in sorted(groups)]


def _layer_list_blocks(module: nn.Module) -> list[list[str]] | None:
    """For a module built around a list of repeated layers (transformers, many CNNs): the parameters before the
    list (embeddings, stem) as block 0, each layer as one block, and any parameters after it (final norm, pooler)
    joined to the last layer."""
    lists = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    lists = [(name, m) for name, m in lists if sum(1 for layer in m if any(True for _ in layer.parameters())) > 1]
    if not lists:
        return None
    list_name, layers = max(lists, key=lambda item: len(item[1]))
    layer_of: dict[str, int] = {}
    for i, layer in enumerate(layers):
        for name, _ in layer.named_parameters():
            layer_of[f"{list_name}.{i}.{name}"] = i
    before: list[str] = []
    blocks: list[list[str]] = [[] for _ in layers]
    seen_layer = False
    for name, _ in module.named_parameters():
        if name in layer_of:
            blocks[layer_of[name]].append(name)
            seen_layer = True
        elif seen_layer:
            blocks[-1].append(name)
        else:
            before.append(name)
    blocks = [block for block in blocks if block]
    return ([before] if before else []) + blocks


def encoder_blocks(module: nn.Module) -> list[list[str]]:
    """The parameter names of ``module`` grouped in blocks, from the input to the output.

    Staged finetuning names "the top 2 blocks" of an encoder with this. The structure comes from the model itself:

    * an encoder that wraps another library's model (:class:`~ml_optim_plugins.multimodal.contract.ModelWrapper`,
      as the library's encoders do): the blocks of the wrapped model, as below (its own parameters join the last);
    * :class:`~ml_optim_plugins.TimmImageEncoder` and timm models: timm's coarse ``group_matcher``
      (the grouping its layer-wise LR decay uses), e.g. resnet: stem, ``layer1`` .. ``layer4``; ViT: embeddings,
      each transformer block (with the final norm);
    * :class:`~ml_optim_plugins.SentenceTransformerTextEncoder`, sentence-transformers and Hugging Face transformers:
      the embeddings, then each transformer layer (with anything after the last layer joined to it);
    * any other module: the longest ``nn.ModuleList`` of layers in it (same rule), else its direct children that
      have parameters, in registration order (parameters of the module itself first).

    Names are relative to ``module``; every parameter is in exactly one block.

    Example:
        >>> from ml_optim_plugins import TimmImageEncoder
        >>> blocks = encoder_blocks(TimmImageEncoder("resnet10t"))
        >>> len(blocks), blocks[0][0], blocks[-1][0]
        (5, 'model.conv1.0.weight', 'model.layer4.0.conv1.weight')
    """
    if isinstance(module, ModelWrapper):
        inner = module.wrapped_model()
        name = next((name for name, sub in module.named_modules() if sub is inner and name), None)
        if name is None:
            raise ValueError(f"{type(module).__name__}.wrapped_model() returned {type(inner).__name__}, which is not "
                             "one of its sub-modules; return the wrapped model itself (e.g. self.model)")
        blocks = _prefixed(f"{name}.", encoder_blocks(inner))
    elif isinstance(getattr(module, "_orig_mod", None), nn.Module):  # torch.compile's wrapper
        return _prefixed("_orig_mod.", encoder_blocks(module._orig_mod))
    else:
        blocks = _timm_blocks(module) or _layer_list_blocks(module)
    if blocks is None:
        own = [name for name, _ in module.named_parameters(recurse=False)]
        blocks = [own] if own else []
        for child_name, child in module.named_children():
            names = [f"{child_name}.{name}" for name, _ in child.named_parameters()]
            if names:
                blocks.append(names)
    all_names = [name for name, _ in module.named_parameters()]
    covered = [name for block in blocks for name in block]
    if sorted(covered) != sorted(all_names):  # a grouping that misses or repeats parameters: one block of all
        missing = [name for name in all_names if name not in set(covered)]
        if missing and blocks:
            blocks[-1].extend(missing)
        if sorted(name for block in blocks for name in block) != sorted(all_names):
            blocks = [all_names]
    return [block for block in blocks if block]


def parse_selector(selector: str) -> tuple[str, slice | int | None]:
    """Split ``"text[-2:]"`` into its target (``"text"``) and block index or slice (``slice(-2, None)``).

    Example:
        >>> parse_selector("text[-2:]"), parse_selector("image[0]"), parse_selector("encoders.*")
        (('text', slice(-2, None, None)), ('image', 0), ('encoders.*', None))
    """
    match = _SELECTOR.match(selector.strip())
    if match is None:
        raise ValueError(
            f"bad module selector {selector!r}; expected a modality or module name or glob, optionally followed by a "
            "block index or slice: 'text', 'encoders.image', 'text[-2:]' (top 2 blocks), 'image[-1]' (top block)"
        )
    target, index = match["target"].strip(), match["index"]
    if index is None:
        return target, None
    index = index.replace(" ", "")
    if ":" not in index:
        if not index:
            raise ValueError(f"bad module selector {selector!r}: empty block index")
        return target, int(index)
    start, stop = index.split(":")
    return target, slice(int(start) if start else None, int(stop) if stop else None)


def select_parameters(
    module: nn.Module, selector: str, modalities: Mapping[str, str] | None = None
) -> list[str]:
    """Qualified names of the parameters of ``module`` that ``selector`` names.

    A selector is a modality name (its encoder, from ``modalities``: ``{modality: module name}``), a module or
    parameter name, or a glob (``"encoders.*"``), optionally with a block index or slice over
    :func:`encoder_blocks` of the named module: ``"text[-1]"`` is the top block of the text encoder, ``"text[-2:]"``
    the top two, ``"image[:2]"`` the first two. A slice past the end is cut as in Python; an index out of range is
    an error.

    Raises:
        ValueError: a malformed selector, one that names nothing, a block selection on a glob, or an index out of
            range, each naming what exists.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> select_parameters(model, "model[-1]", {"model": ""})
        ['2.weight', '2.bias']
        >>> select_parameters(model, "0")
        ['0.weight', '0.bias']
    """
    target, index = parse_selector(selector)
    modalities = dict(modalities or {})
    names = [name for name, _ in module.named_parameters()]
    modules = dict(module.named_modules())
    if target in modalities:
        target = modalities[target]
    elif index is not None and target not in modules:
        raise ValueError(
            f"selector {selector!r}: {target!r} is neither a modality {sorted(modalities)} nor a module name; block "
            "indices need one of them (not a glob)"
        )
    if index is None:
        if target == "":
            return names
        selected = [name for name in names if name_matches(name, [target])]
        if not selected:
            top = sorted({name.split(".")[0] for name in names})
            raise ValueError(
                f"selector {selector!r} matches no parameter; give a modality {sorted(modalities)}, or a module name "
                f"or glob under the top-level modules {top}"
            )
        return selected
    blocks = encoder_blocks(modules[target])
    prefix = f"{target}." if target else ""
    if isinstance(index, int):
        if not -len(blocks) <= index < len(blocks):
            raise ValueError(f"selector {selector!r}: block {index} out of range; {target or 'the model'} has "
                             f"{len(blocks)} blocks (see ml_optim_plugins.finetuning.encoder_blocks)")
        chosen = [blocks[index]]
    else:
        chosen = blocks[index]
        if not chosen:
            raise ValueError(f"selector {selector!r} selects no block of the {len(blocks)} of {target or 'the model'}")
    return [prefix + name for block in chosen for name in block]


"""Predictor: a trained classifier loaded from its checkpoint alone, classifying (image, text) pairs in Python."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import move_data_to_device
from PIL import Image

from ml_optim_plugins.data.preprocessing import preprocessing_pipeline
from ml_optim_plugins.multimodal.classifier import MultimodalClassifier
from ml_optim_plugins.multimodal.encoders import TimmImageEncoder
from ml_optim_plugins.prediction.writer import class_names_of


@dataclass(frozen=True)
class Prediction:
    """What a trained classifier says about one (image, text) pair.

    Attributes:
        label: the predicted class, by name.
        probabilities: ``{class name: probability}``, every class.
        modality_labels: ``{modality: class name}``: what each modality alone predicts (the modality contract's
            per-modality predictions).
    """

    label: str
    probabilities: dict[str, float]
    modality_labels: dict[str, str]


def _imported_class(class_path: str) -> type | None:
    """The class ``class_path`` names, if its module is already imported (a checkpoint never imports code)."""
    module_name, _, name = class_path.rpartition(".")
    module = sys.modules.get(module_name)
    found = getattr(module, name, None) if module is not None else None
    return found if isinstance(found, type) else None


def _without_weight_sources(encoders: Any) -> Any:
    """The encoders' config with the weights they would load at construction (timm's hub, a packaged file, another
    checkpoint) switched off: the classifier's checkpoint holds all their weights, and the file a recipe pretrained
    from may be gone or, offline, the hub unreachable."""
    if not isinstance(encoders, Mapping):
        return encoders
    cleaned = {}
    for modality, config in encoders.items():
        if isinstance(config, Mapping) and isinstance(config.get("class_path"), str):
            cls = _imported_class(config["class_path"])
            if cls is not None and issubclass(cls, TimmImageEncoder):
                init_args = {**config.get("init_args", {}), "pretrained": False, "checkpoint_path": None,
                             "checkpoint_prefix": None}
                config = {**config, "init_args": init_args}
        cleaned[modality] = config
    return cleaned


class Predictor:
    """Classify (image, text) pairs with a trained classifier, prepared exactly as its data was.

    :meth:`from_checkpoint` needs nothing but a checkpoint written by ``ml-optim-plugins fit`` (or by any run whose
    model was built from its config, with ``class_names`` and ``preprocessing`` in its hyperparameters): the
    checkpoint is loaded with ``weights_only=True`` (no code from the file runs; a subclass of
    :class:`~ml_optim_plugins.MultimodalClassifier` must be imported first), the label names and the preprocessing
    (image transform, tokenizer, longest text) come from its hyperparameters, and no recipe file is read.
    :meth:`predict` runs the model's own ``predict_step`` in eval mode, so its results are those of
    ``trainer.predict`` and ``ml-optim-plugins predict``.

    Args:
        model: the trained classifier (``predict_step`` returning ``probs`` and ``modality_probs``).
        preprocessing: a data module's :attr:`~ml_optim_plugins.MultimodalDataModule.preprocessing`; default: the
            model's ``preprocessing``.
        class_names: the class names in id order; default: the model's ``class_names``.
        device: where to run the model (default: where it is).

    Raises:
        ValueError: when neither the arguments nor the model give the preprocessing.

    Example:
        >>> predictor = Predictor.from_checkpoint("runs/quickstart/version_0/checkpoints/last.ckpt")  # doctest: +SKIP
        >>> [p.label for p in predictor.predict([("photo.jpg", "what a lovely day")])]  # doctest: +SKIP
        ['positive']
    """

    def __init__(
        self,
        model: pl.LightningModule,
        preprocessing: Mapping[str, Any] | None = None,
        class_names: Sequence[str] | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        preprocessing = preprocessing if preprocessing is not None else getattr(model, "preprocessing", None)
        if preprocessing is None:
            raise ValueError(
                f"{type(model).__name__} carries no preprocessing (a checkpoint from before it was saved, or a model "
                "built in Python without it); pass preprocessing=<data module>.preprocessing of the data it was "
                "trained on"
            )
        self.model = model.to(device) if device is not None else model
        self.model.eval()
        self.class_names = list(class_names) if class_names is not None else class_names_of(model)
        self.preprocessing = dict(preprocessing)
        self.transform, self.collate = preprocessing_pipeline(self.preprocessing)

    @classmethod
    def from_checkpoint(
        cls, checkpoint_path: str | Path, device: str | torch.device = "cpu", **kwargs: Any
    ) -> Predictor:
        """Load the classifier of a checkpoint (``weights_only``), with its label names and preprocessing.

        Args:
            checkpoint_path: a ``.ckpt`` file of ``ml-optim-plugins fit``.
            device: where to run the model.
            **kwargs: ``preprocessing``, ``class_names``: override what the checkpoint holds.

        Raises:
            FileNotFoundError: when the checkpoint does not exist.
            ValueError: when its hyperparameters cannot rebuild the model (a model built in Python with live
                encoder modules: load it yourself and pass it to ``Predictor(model, preprocessing)``).
        """
        path = Path(checkpoint_path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
        hparams = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters", {})
        if "encoders" not in hparams:
            raise ValueError(
                f"checkpoint {str(path)!r} does not say how to build its model (no 'encoders' in its hyperparameters: "
                "a model built in Python); build it, load the weights, and pass it to Predictor(model, preprocessing)"
            )
        model = MultimodalClassifier.load_from_checkpoint(
            path, map_location="cpu", weights_only=True, encoders=_without_weight_sources(hparams["encoders"])
        )
        return cls(model, device=device, **kwargs)

    def _image(self, image: Any, position: int) -> Image.Image:
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        if not isinstance(image, (str, Path)):
            raise TypeError(f"sample {position}: the image is a {type(image).__name__}; give a path or a PIL image")
        try:
            with Image.open(image) as opened:
                return opened.convert("RGB")
        except (OSError, ValueError) as err:
            raise ValueError(f"sample {position}: image {str(image)!r} cannot be read ({err})") from err

    @torch.inference_mode()
    def predict(self, samples: Iterable[tuple[Any, str]], batch_size: int = 32) -> list[Prediction]:
        """Classify ``(image, text)`` pairs (an image is a file path or a PIL image), in order.

        Raises:
            TypeError: for a sample that is not an (image, text) pair.
            ValueError: for an image that cannot be read or an empty text, naming the sample's position.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        prepared = []
        for position, sample in enumerate(samples):
            if not isinstance(sample, (tuple, list)) or len(sample) != 2 or not isinstance(sample[1], str):
                raise TypeError(f"sample {position} is {sample!r}; give (image path or PIL image, text) pairs")
            image, text = sample
            if not text.strip():
                raise ValueError(f"sample {position}: empty text")
            prepared.append({"image": self.transform(self._image(image, position)), "text": text.strip(),
                             "index": position})
        device = next(self.model.parameters()).device
        predictions = []
        for start in range(0, len(prepared), batch_size):
            batch = move_data_to_device(self.collate(prepared[start : start + batch_size]), device)
            outputs = self.model.predict_step(batch, start // batch_size)
            modality_probs = outputs.get("modality_probs", {})
            for i, probs in enumerate(outputs["probs"].float().cpu()):
                predictions.append(Prediction(
                    label=self.class_names[int(probs.argmax())],
                    probabilities={name: float(p) for name, p in zip(self.class_names, probs)},
                    modality_labels={m: self.class_names[int(mp[i].argmax())] for m, mp in modality_probs.items()},
                ))
        return predictions

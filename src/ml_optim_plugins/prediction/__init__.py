"""Using a trained model: Predictor (Python), PredictionWriter (predictions.csv from trainer.predict and the CLI),
and the checks that a checkpoint fits the data it predicts on."""

from ml_optim_plugins.prediction.checkpoint import check_checkpoint_fits, checkpoint_mismatches
from ml_optim_plugins.prediction.predictor import Prediction, Predictor
from ml_optim_plugins.prediction.writer import PredictionWriter

__all__ = ["Prediction", "PredictionWriter", "Predictor", "check_checkpoint_fits", "checkpoint_mismatches"]

"""Modality balancing: the ModalityBalancer callback and the functional cores of its methods (OGM-GE, AGM, MMPareto)."""

from ml_optim_plugins.balancing.agm import agm_coefficients, agm_ratios, mono_modal_losses
from ml_optim_plugins.balancing.callback import ModalityBalancer
from ml_optim_plugins.balancing.mmpareto import mmpareto_combine, mmpareto_weights, mmpareto_weights_from_dots
from ml_optim_plugins.balancing.ogm_ge import modulate_gradient, ogm_ge_coefficients, true_class_scores

__all__ = [
    "ModalityBalancer",
    "agm_coefficients",
    "agm_ratios",
    "mmpareto_combine",
    "mmpareto_weights",
    "mmpareto_weights_from_dots",
    "modulate_gradient",
    "mono_modal_losses",
    "ogm_ge_coefficients",
    "true_class_scores",
]

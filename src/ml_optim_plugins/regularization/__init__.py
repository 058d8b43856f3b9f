"""Regularizers: Gaussian and variational dropout, modality dropout, dropout replacement, elastic-net penalty."""

from ml_optim_plugins.regularization.elastic_net import elastic_net_penalty, regularized_parameters
from ml_optim_plugins.regularization.gaussian_dropout import GaussianDropout, gaussian_dropout
from ml_optim_plugins.regularization.modality_dropout import ModalityDropout, modality_keep_mask
from ml_optim_plugins.regularization.penalty import ElasticNetPenalty, PenaltyCallback, VariationalKL
from ml_optim_plugins.regularization.replace import DropoutReplacement, replace_dropout
from ml_optim_plugins.regularization.variational import (
    VariationalGaussianDropout,
    VariationalLinear,
    kl_kingma,
    kl_molchanov,
    variational_kl,
)

__all__ = [
    "DropoutReplacement",
    "ElasticNetPenalty",
    "GaussianDropout",
    "ModalityDropout",
    "PenaltyCallback",
    "VariationalGaussianDropout",
    "VariationalKL",
    "VariationalLinear",
    "elastic_net_penalty",
    "gaussian_dropout",
    "kl_kingma",
    "kl_molchanov",
    "modality_keep_mask",
    "regularized_parameters",
    "replace_dropout",
    "variational_kl",
]

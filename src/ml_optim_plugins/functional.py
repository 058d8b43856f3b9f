"""The functional cores of the library's methods: pure torch, no Lightning, no state.

Each function here is what a callback or module of :mod:`ml_optim_plugins` computes once it has gathered its inputs
(as ``torchmetrics.functional`` is to torchmetrics' classes): use it in a training loop of your own, or to see what a
callback will do before attaching it. The functions live beside the class that calls them
(``ml_optim_plugins.balancing.ogm_ge``, ``ml_optim_plugins.regularization.gaussian_dropout``, ...) and are the same
objects here.

============================  ==========================================================  ====================
function                      what                                                        used by
============================  ==========================================================  ====================
``true_class_scores``         each modality's summed probability of the true class        ``ModalityBalancer``
``ogm_ge_coefficients``       OGM-GE gradient coefficients from those scores
``modulate_gradient``         a gradient scaled by its coefficient, plus OGM-GE's noise
``mono_modal_losses``         each modality's cross-entropy on its own logits
``agm_coefficients``          AGM coefficients from the running mono-modal losses
``mmpareto_weights``          MMPareto's min-norm weights of two gradients
``mmpareto_combine``          the combined MMPareto gradient
``gaussian_dropout``          multiplicative Gaussian noise of mean 1                     ``GaussianDropout``
``modality_keep_mask``        which modalities each sample keeps                          ``ModalityDropout``
``elastic_net_penalty``       ``l1 * sum |w| + l2 * sum w^2``                             ``ElasticNetPenalty``
``kl_kingma``                 variational dropout's KL (Kingma et al. 2015)               ``VariationalKL``
``kl_molchanov``              variational dropout's KL (Molchanov et al. 2017)
``variational_kl``            the summed KL of a model's variational layers
``warmup_factor``             the LR multiplier during warmup                             ``WarmupDecay``
``hessian_top_eigenvalue``    the loss Hessian's extreme eigenvalues                      ``CurvatureProbe``
============================  ==========================================================  ====================

Example:
    >>> import torch
    >>> from ml_optim_plugins.functional import ogm_ge_coefficients, true_class_scores, warmup_factor
    >>> logits = {"image": torch.zeros(2, 3), "text": torch.tensor([[5.0, 0, 0], [0, 5.0, 0]])}
    >>> scores = true_class_scores(logits, torch.tensor([0, 1]))
    >>> {name: round(k, 3) for name, k in ogm_ge_coefficients(scores, alpha=0.5, smooth=True).items()}
    {'image': 1.0, 'text': 0.247}
    >>> warmup_factor(250, warmup_steps=1000)
    0.25
"""

from ml_optim_plugins.balancing import (
    agm_coefficients,
    mmpareto_combine,
    mmpareto_weights,
    modulate_gradient,
    mono_modal_losses,
    ogm_ge_coefficients,
    true_class_scores,
)
from ml_optim_plugins.diagnostics import hessian_top_eigenvalue
from ml_optim_plugins.regularization import (
    elastic_net_penalty,
    gaussian_dropout,
    kl_kingma,
    kl_molchanov,
    modality_keep_mask,
    variational_kl,
)
from ml_optim_plugins.schedules import warmup_factor

__all__ = [
    "agm_coefficients",
    "elastic_net_penalty",
    "gaussian_dropout",
    "hessian_top_eigenvalue",
    "kl_kingma",
    "kl_molchanov",
    "mmpareto_combine",
    "mmpareto_weights",
    "modality_keep_mask",
    "modulate_gradient",
    "mono_modal_losses",
    "ogm_ge_coefficients",
    "true_class_scores",
    "variational_kl",
    "warmup_factor",
]

"""Transcoder ensembles: E sparse transcoders x -> h trained side by side in one vectorised pass.

    from sae_cxr.transcoders import EnsembleConfig, TrainConfig, train_ensemble, evaluate_ensemble
    model, history = train_ensemble(x, h, EnsembleConfig(d_in=256, d_out=256), TrainConfig())
    model.save("artifacts/run/transcoders")           # ensemble.safetensors + config.json, raw units
    metrics = evaluate_ensemble(model, x_test, h_test, W2, b2, labels)
    print(metrics.table())

Modules: ensemble (the stacked model, codes, save/load, folded normalisation), train (the
one-pass trainer), metrics (per-member quality), sparse_ops (selection and sparse autograd;
native CPU kernels in _kernels.c with a torch path for CUDA), synthetic (test data).
"""

from sae_cxr.transcoders.ensemble import (EnsembleConfig, EnsembleOutput, Normalization, SparseCodes, Transcoder,
                                          TranscoderEnsemble, fold_normalization)
from sae_cxr.transcoders.metrics import EnsembleMetrics, MetricsAccumulator, evaluate_ensemble
from sae_cxr.transcoders.train import EnsembleTrainer, Interrupted, TrainConfig, TrainHistory, train_ensemble

__all__ = [
    "EnsembleConfig", "EnsembleMetrics", "EnsembleOutput", "EnsembleTrainer", "Interrupted", "MetricsAccumulator",
    "Normalization", "SparseCodes", "TrainConfig", "TrainHistory", "Transcoder", "TranscoderEnsemble",
    "evaluate_ensemble", "fold_normalization", "train_ensemble",
]

"""The patching engine and its metrics: layer windows, restorations of vanilla sites inside the unlearned model,
recovery metrics and sweeps, and the optional TransformerLens adapter."""

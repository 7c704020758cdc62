"""fer-pipeline: FER2013 facial-expression classification, driven by DVC.

The subpackages follow the pipeline: data, model, training, evaluation, explanations, use,
tools (docs/architecture.md)."""

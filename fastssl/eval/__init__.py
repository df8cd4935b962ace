"""Taking a trained backbone out of a run: ``fastssl-export`` (safetensors and a torchvision-compatible
state_dict) and the offline evaluations on a converted dataset, ``fastssl-knn`` and ``fastssl-linear``."""

"""Taking a trained backbone out of a run and evaluating it, one module per protocol.

    export.py, weights.py   fastssl-export (safetensors and a torchvision-compatible state_dict), reading them back
    features.py, knn.py     fastssl-knn: frozen features of the eval view, weighted kNN
    linear.py               fastssl-linear: --protocol features (the quick probe) or paper (the papers' protocol)
    finetune.py             fastssl-finetune: semi-supervised fine-tuning on 1 % / 10 % of the labels
    supervised.py           the SGD loop linear (paper) and fine-tuning share: loaders, torchrun, resume, scoring
    subsets.py              the labelled subsets: the shipped ImageNet lists (imagenet_subsets/), balanced ones
    report.py               fastssl-eval RUN_DIR: every protocol beside random init, report.json/.md/.png
    group.py, protocol_cli.py   the evaluations' torchrun group; the command-line half linear and finetune share
"""

"""The names a config may use, by registry: light lists that import nothing heavy, so that reading and checking a
config needs neither torch nor any model code. Each implementation registers against exactly these names
(``tests/test_config.py`` checks that every registry and its list agree)."""

SOURCES = ("emoji", "cub", "cars196", "sop", "inshop", "folder")
"""``data.source`` (``pipeline.data.sources.SOURCES``)."""
BACKBONES = ("resnet18", "resnet50", "googlenet", "bninception", "efficientnet_lite0")
"""``model.backbone`` built in (``pipeline.model.backbone.BACKBONES``); beside them any ``timm/<model name>``."""
TIMM_PREFIX = "timm/"
ATTENTION_KINDS = ("additive", "cbam", "avg")
"""``model.attention.kind`` (``pipeline.model.attention.KINDS``)."""
ADVERSARY_MODES = ("reversal", "confusion")
"""``model.adversary.mode`` (``pipeline.model.adversary``)."""
LOSSES = ("multi_similarity", "contrastive", "triplet", "margin", "ntxent", "npairs", "proxy_nca", "proxy_anchor")
"""``loss.name`` (``pipeline.objectives.LOSSES``: pytorch-metric-learning losses)."""
DEVICES = ("auto", "cpu", "cuda")
"""``train.device`` (``pipeline.runtime``)."""
ENGINES = ("auto", "ranks", "knn")
"""``eval.engine`` (``pipeline.evaluation.metrics``); ``auto`` picks one."""

"""Fine-tune the encoder on a site's own images, so that its embeddings suit retrieval there.

:func:`train_encoder` trains EfficientNet-Lite0 (the default encoder) on a MedMNIST-format ``.npz``
or a DICOM archive, and writes a checkpoint that ``medsearch index``, ``query`` and ``evaluate``
load as ``encoder.checkpoint``::

    from medsearch.train import train_encoder
    report = train_encoder("breastmnist.npz", out="runs/breast.pt", size=64, epochs=30)
    report.config_path        # runs/breast.toml: give it to index / query / evaluate as --config

The settings (``size``, ``epochs``, ...) are the fields of :class:`TrainOptions`; give them as
keywords, or as one object: ``train_encoder(data, out, options=TrainOptions(epochs=30))``.

    options.py   TrainOptions, TrainMode, SupervisedLoss, VAL_METRICS: the settings, checked on entry
    api.py       train_encoder and TrainReport: check, load, train, write the config and the record
    data.py      the npz or archive images, preprocessed as indexing does, split by patient
    augment.py   MONAI augmentations fit for medical images
    trainer.py   the loop: heads, losses, schedule, validation, checkpoints and resume

What the network learns is exactly what indexing uses: the globally pooled 1280-d features of the
last conv layer, L2-normalized (the classifier of the ImageNet network is kept, untouched, so that
the weights file loads strictly). Images go through :func:`medsearch.transforms.preprocess_volume`
with the run's config, the same call as indexing, so the preprocessing the index records is the
one the network was trained on.

Two modes:

* ``supervised`` (labels: the npz labels, or a labels CSV beside an archive). Three losses, all
  on the normalized embedding: ``multisimilarity`` (Multi-Similarity loss with its miner,
  pytorch-metric-learning), ``supcon`` (supervised contrastive) and ``classifier`` (cross-entropy
  through a linear head on the embedding; the head is dropped). Batches hold as many images of
  each class, which matters for imbalanced sets such as PneumoniaMNIST (9 pneumonia : 1 normal).
  Which is better was measured on validation splits (docs/benchmarks/training.md).
  Multi-Similarity is the default: a pair loss shapes the neighbourhoods that retrieval reads
  directly and its miner keeps learning from the hard pairs of an imbalanced set, whereas
  cross-entropy only needs the classes linearly separable, which can leave a class spread out and
  its members' nearest neighbours in the other class. On BreastMNIST's few hundred images the
  classifier's simpler objective did as well or slightly better.
* ``selfsupervised`` (no labels): SimCLR. Two augmented views of each image should embed close
  and away from the rest of the batch (NT-Xent loss through a small projection head, dropped
  afterwards). The augmentations are MONAI's and fit for medical images: small rotations, zoom
  and shift, contrast (gamma), intensity scaling and shift, gaussian noise. There are no flips:
  laterality carries meaning in medical images (``flips=True`` allows horizontal ones).
  Two safeguards keep SimCLR from first tearing down the ImageNet features it starts from
  (their effect is measured in docs/benchmarks/training.md):
  the first epoch trains only the new projection head, on the fixed encoder (``head_epochs``),
  so that the encoder's first gradients come through a head that already means something; and
  BatchNorm keeps its ImageNet statistics (``freeze_norm``) instead of re-estimating them on
  64-image batches of augmented, upscaled images. Its scale and shift still learn.

``auto`` picks supervised when labels are at hand.

Validation: the npz ``val`` split (never the ``test`` split, which is not even read), or for an
archive a held-out fraction of the *patients*, so that slices of one patient never sit on both
sides. After each epoch the validation cases query the training cases (cosine, exact) and the
result is scored with :mod:`medsearch.metrics`; supervised runs keep the checkpoint with the best
``select_metric`` (default ``knn_acc@11``, ties broken by ``precision@10``). A self-supervised run
selects by its validation loss, which needs no label; the label metrics are still reported
when validation labels exist.

Files written beside ``out`` (``runs/breast.pt``), each atomically (temporary file, then rename):

* ``breast.pt``: the best weights, a plain EfficientNet-Lite0 state dict;
* ``breast.last.pt``: the state to resume from (weights, heads, optimizer, scheduler, epoch,
  RNG states, history); a run started again with the same settings continues from it;
* ``breast.json``: training settings, the preprocessing config, seed, data hash, metrics per
  epoch, the best epoch, the weights' sha256 and the wall time;
* ``breast.toml``: a config with the run's preprocessing and ``encoder.checkpoint`` set, ready for
  ``medsearch index/query/evaluate --config``.

Randomness is seeded from ``seed`` and re-seeded at the start of every epoch from
``(seed, epoch)``, so a resumed run repeats exactly the epochs an uninterrupted run would have.
"""

from __future__ import annotations

from medsearch.train.api import TrainReport, train_encoder
from medsearch.train.options import VAL_METRICS, SupervisedLoss, TrainMode, TrainOptions

__all__ = ["VAL_METRICS", "SupervisedLoss", "TrainMode", "TrainOptions", "TrainReport", "train_encoder"]

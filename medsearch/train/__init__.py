"""Adapt the encoder to a site's own images, so that its embeddings suit retrieval there, and never
leave it worse than the frozen encoder.

:func:`train_encoder` reads a MedMNIST-format ``.npz`` or a DICOM archive, picks a recipe from the
data (unless told), trains, and writes a config that ``medsearch index``, ``query`` and
``evaluate`` load::

    from medsearch.train import train_encoder
    report = train_encoder("breastmnist.npz", out="runs/breast")
    report.verdict            # what it chose, against the frozen encoder, and why
    report.config_path        # runs/breast.toml: give it to index / query / evaluate as --config

The settings are the fields of :class:`TrainOptions`; give them as keywords, or as one object:
``train_encoder(data, out, options=TrainOptions(mode="adapter"))``.

    options.py   TrainOptions, TrainMode, SupervisedLoss, VAL_METRICS: the settings, checked on entry
    recipe.py    pick_recipe: mode, input size, epochs and loss from the data, within a time budget
    api.py       train_encoder and TrainReport: check, pick, run, write the config and the record
    runs.py      the adapter run and the network run, each ending with the choice of encoder
    adapter.py   adapters: cross-validation over train + val on cached frozen features, the final fit
    select.py    candidates scored per query, bootstrap intervals, the choice
    data.py      the npz or archive cases, split by patient, preprocessed as indexing does
    augment.py   MONAI augmentations fit for medical images
    trainer.py   the network's loop: heads, losses, schedule, validation, checkpoints and resume

**The frozen encoder is always the first candidate.** Every run scores it on validation before
training (epoch 0 of a network run; the first row of an adapter run's cross-validation), and the
written encoder is the best candidate only when it beats the frozen one by more than the noise: the
bootstrap interval of its per-query gain lies above zero (:mod:`medsearch.train.select`). Otherwise
the run says so in one sentence and writes the frozen config.

Modes (``mode``; ``auto``, the default, lets the recipe pick, :mod:`medsearch.train.recipe`):

* ``adapter`` (labels): every image is embedded once by the frozen encoder; small projections
  (``linear``, or a 2-layer ``mlp``) learn on the cached features with a metric-learning loss, in
  seconds to minutes on a CPU. Candidates are compared by k-fold cross-validation over train and
  val together, far less noisy than a val split of tens of images; the chosen one is trained on
  all the cases, as an ensemble of five seeds, and stored as ``encoder.adapter`` in the config (an
  index records it: :mod:`medsearch.encoders.adapter`).
* ``supervised`` (labels): fine-tunes the network. Three losses, all on the normalized
  embedding: ``multisimilarity`` (Multi-Similarity loss with its miner, pytorch-metric-learning),
  ``supcon`` (supervised contrastive) and ``classifier`` (cross-entropy through a linear head on
  the embedding; the head is dropped). Batches hold as many images of each class, which matters
  for imbalanced sets. A pair loss shapes the neighbourhoods that retrieval reads directly and its
  miner keeps learning from the hard pairs of an imbalanced set, whereas cross-entropy only needs
  the classes linearly separable; on a small balanced set its simpler objective does as well.
* ``selfsupervised`` (no labels): SimCLR. Two augmented views of each image should embed close
  and away from the rest of the batch (NT-Xent loss through a small projection head, dropped
  afterwards). The augmentations are MONAI's and fit for medical images: small rotations, zoom
  and shift, contrast (gamma), intensity scaling and shift, gaussian noise. There are no flips:
  laterality carries meaning in medical images (``flips=True`` allows horizontal ones).
  Two safeguards keep SimCLR from first tearing down the ImageNet features it starts from: the
  first epoch trains only the new projection head, on the fixed encoder (``head_epochs``), so
  that the encoder's first gradients come through a head that already means something; and
  BatchNorm keeps its ImageNet statistics (``freeze_norm``) instead of re-estimating them on
  64-image batches of augmented, upscaled images. Its scale and shift still learn. Without labels
  the run cannot compare with the frozen encoder, and says so.

What a fine-tuned network learns is exactly what indexing uses: the globally pooled 1280-d features
of the last conv layer, L2-normalized (the classifier of the ImageNet network is kept, untouched,
so that the weights file loads strictly). Images go through
:func:`medsearch.transforms.preprocess_volume` with the run's config, the same call as indexing.

Validation: the npz ``val`` split (never the ``test`` split, which is not even read), or for an
archive a held-out fraction of the *patients*, so that slices of one patient never sit on both
sides. Validation cases query the training cases (cosine, exact) and the result is scored with
:mod:`medsearch.metrics`; ``select_metric`` (default ``map_hits@5``) compares the candidates.

Files written beside ``out`` (``runs/breast``), each atomically:

* ``breast.toml``: the chosen encoder's config, ready for ``medsearch index/query/evaluate --config``;
* ``breast.json``: the recipe and why, every candidate with its interval, the choice, the
  settings, the data hash, the history of a network run and the wall time;
* ``breast.adapter.pt``: the adapter, when one is chosen;
* ``breast.pt`` and ``breast.last.pt`` (network runs): the best epoch's weights (removed when the
  frozen encoder is chosen) and the state to resume from.

Randomness is seeded from ``seed``; a network run re-seeds at the start of every epoch from
``(seed, epoch)``, so a resumed run repeats exactly the epochs an uninterrupted run would have.
"""

from __future__ import annotations

from medsearch.train.api import TrainReport, train_encoder
from medsearch.train.options import VAL_METRICS, SupervisedLoss, TrainMode, TrainOptions

__all__ = ["VAL_METRICS", "SupervisedLoss", "TrainMode", "TrainOptions", "TrainReport", "train_encoder"]

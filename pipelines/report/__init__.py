"""Run reports: what the network learned, as MLflow artifacts and as one offline HTML page.

In, at training time (:func:`log_training_report`, on the driver inside the active MLflow run,
after evaluation): the trained Keras model, rank 0's per-epoch ``history``, its
:class:`~pipelines.tasks.Evaluation` (the split's metrics, and a bounded sample of its images
with the model's outputs: class probabilities, or reconstructions) and its
:class:`~pipelines.tasks.Task`, which says which sections apply.
Out: artifacts under ``report/`` of the run, each plot as a PNG beside the numbers it shows:

===============================  ===============================================================
``learning_curves.png/.csv``     train and validation loss, accuracy (or reconstruction error)
                                 and learning rate per epoch
``confusion_matrix.png/.csv``    true x predicted counts on the evaluation split (classifiers)
``classification_report.json``   per-class precision, recall, F1, support; accuracy; averages
``misclassified.png/.csv``       the most confidently misclassified images (classifiers)
``attribution.png/.json``        saliency and Grad-CAM of the most confident mistakes and as
                                 many confidently correct images (classifiers)
``layer_stats.png/.csv``         per epoch and layer: weight and gradient norms, update ratio,
                                 activation min/max/mean on a probe batch, with vanishing or
                                 exploding gradients flagged
``filters_layer1.png/.json``     the first convolution's kernels (for an MLP: the first dense
                                 layer's weights per unit, reshaped to the image)
``filters_topk_<layer>.png``     per conv layer, the top-k test images of each filter cropped to
``filters_topk.json/.csv``       its receptive field around the peak, and the numbers
``activations.png/.json``        every conv/pool/activation map for a few sample images, each
                                 layer with its shape and min/max activation (as ConvNetJS shows)
``embeddings.png/.csv``          2-D PCA (and optionally t-SNE) of the ``embedding`` layer
                                 (the task's embedding layer), coloured by class
``embeddings_sprite.png/.json``  thumbnails of the points of the page's interactive plot
``reconstructions.png/.csv``     originals beside reconstructions (reconstruction task)
``tensorboard/``                 TensorBoard logs: scalars (``train/``, ``validation/``), graph,
                                 weight and gradient histograms (``histograms/``) and the
                                 embedding projector (``projector_config.pbtxt``, ``projector/``)
``summary.json``                 what :func:`log_training_report` returns
===============================  ===============================================================

In, afterwards (:func:`render_run_report`, :func:`render_comparison`): run ids and a tracking
URI. Out: one self-contained HTML file per run (or per comparison): images embedded as base64
data URIs, CSS and the embedding plot's script inline, no external references and nothing
fetched, so it opens offline from the file system and can be mailed around; the run page is
also logged to the run as ``report/report.html``.

The package, one job per module, data flowing one way
(``numeric`` <- ``plots`` <- ``artifacts``; ``pages`` <- ``render``):

===============  ===============================================================================
``numeric``      pure numpy: confusion matrix, per-class scores, errors, PCA/t-SNE, samples
``probe``        Keras introspection: the layers to draw and their outputs
``plots``        matplotlib figures on the Agg canvas (never ``pyplot``)
``filters``      receptive fields and each filter's top-k images (numbers, grid, section)
``attribution``  saliency and Grad-CAM (numbers, figures, section); also used by
                 :mod:`pipelines.explain`
``layers``       the per-layer statistics section: CSV, small multiples, histograms, warnings
``embeddings``   the embedding section's thumbnails and TensorBoard projector files
``artifacts``    :func:`write_training_report` / :func:`log_training_report`, one writer per
                 section
``pages``        HTML building: the run page and the comparison page, self-contained
``render``       :func:`render_run_report` / :func:`render_comparison`: MLflow reads, page writes
===============  ===============================================================================

matplotlib, TensorFlow, scikit-learn and MLflow are imported inside the functions that need
them, so importing this package costs numpy only.
"""

from pipelines.report.artifacts import (
    FILTERS_SHOWN,
    MISCLASSIFIED_SHOWN,
    RECONSTRUCTIONS_SHOWN,
    REPORT_DIR,
    log_training_report,
    write_training_report,
)
from pipelines.report.numeric import (
    classification_report,
    confusion_matrix,
    most_confident_errors,
    pca_2d,
    pick_samples,
    tsne_2d,
)
from pipelines.report.plots import DPI
from pipelines.report.probe import activation_layers, layer_outputs
from pipelines.report.render import (
    REPORT_HTML,
    render_comparison,
    render_run_report,
)

__all__ = [
    "DPI",
    "FILTERS_SHOWN",
    "MISCLASSIFIED_SHOWN",
    "RECONSTRUCTIONS_SHOWN",
    "REPORT_DIR",
    "REPORT_HTML",
    "activation_layers",
    "classification_report",
    "confusion_matrix",
    "layer_outputs",
    "log_training_report",
    "most_confident_errors",
    "pca_2d",
    "pick_samples",
    "render_comparison",
    "render_run_report",
    "tsne_2d",
    "write_training_report",
]

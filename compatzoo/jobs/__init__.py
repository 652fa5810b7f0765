"""Gallery jobs a platform runs outside a training run, on stored embeddings and images:
``upgrade`` (stored embeddings into the new space), ``order`` (the backfill order) and
``embed`` (re-embedding images, in that order). Each keeps a manifest in its output
folder, resumes after a kill and never leaves a partial output file."""

from compatzoo.jobs.embed import embed_images, image_list
from compatzoo.jobs.manifest import MANIFEST, JobStateError, Manifest, read_manifest
from compatzoo.jobs.order import order_gallery
from compatzoo.jobs.upgrade import Step, bundle_step, upgrade_gallery, upgrader_step

__all__ = ["MANIFEST", "JobStateError", "Manifest", "Step", "bundle_step", "embed_images",
           "image_list", "order_gallery", "read_manifest", "upgrade_gallery", "upgrader_step"]

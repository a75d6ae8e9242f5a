"""Images and splits: the data sources (Debian IDX files, tfds, image folders) behind one
``ImageSource`` and the member / non-member split manifests. Imports only ``drc_jax.core``."""

"""``lungsam node``: a DICOM node (pynetdicom Storage SCP) that segments chest radiographs as they arrive and sends
DICOM-SEG / SR (/ SC) to a PACS by C-STORE and/or STOW-RS. Torch-free; needs ``lungsam[dicom]``. See docs/pacs.md.

Modules: :mod:`~lungsam.node.config` (``node.toml``), :mod:`~lungsam.node.store` (spool, outbox, ledger, audit
log), :mod:`~lungsam.node.service` (the SCP, the worker and the senders).
"""

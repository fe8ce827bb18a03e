"""captionfleet: image captioning at archive and stream scale.

One installed namespace. ``captionfleet.core`` is the library every part uses; ``captionfleet.worker``,
``captionfleet.trainer`` and ``captionfleet.dashboard`` are the applications, kept in the repository's
top-level ``worker/``, ``trainer/`` and ``dashboard/`` folders (this folder links to them); ``captionfleet.cli``
is the ``captionfleet`` command. docs/architecture.md draws the layers.
"""

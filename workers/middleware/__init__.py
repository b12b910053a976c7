"""Dramatiq middleware of billing-queue, one per file."""

from .outbox_sweeper import OutboxSweeper
from .unknown_actors import UnknownActorRecorder

__all__ = ["OutboxSweeper", "UnknownActorRecorder"]

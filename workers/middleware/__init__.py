"""Dramatiq middleware of billing-queue, one per file."""

from .outbox_sweeper import OutboxSweeper

__all__ = ["OutboxSweeper"]

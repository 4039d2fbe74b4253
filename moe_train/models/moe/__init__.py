"""Mixture-of-Experts layer: router, losses, dispatch plans, dispatchers and grouped experts."""

from moe_train.models.moe.dispatch import LocalDispatcher
from moe_train.models.moe.experts import GroupedExperts, loop_reference
from moe_train.models.moe.layer import MoELayer, MoEStats
from moe_train.models.moe.router import NoisyTopKRouter, Routing, TopKRouter

__all__ = ["GroupedExperts", "LocalDispatcher", "MoELayer", "MoEStats", "NoisyTopKRouter", "Routing",
           "TopKRouter", "loop_reference"]

"""Hard negatives from the negative store, over a training run: the whole lifecycle in one package.

A store version travels:

    mining (NegativeStore.publish, embedlib/negstore.py)
      -> runtime.VersionFeed        rank 0 finds and verifies it off the hot path
      -> runtime.NegativesRuntime   every rank adopts it at the same step; rule.DynamicNegativeState
                                    holds each sample's window and scores
      -> plan.PlannedNegatives      the sampler's plan names the version, each row's window, the slice
      -> source.StoreReader         a DataLoader worker reads the window's corpus rows and mining scores
      -> the task                   gets the passages of its slice (tasks never open the store)
      -> plan.BatchNegatives        the batch brings the plan and the mining scores back
      -> runtime.after_step         live scores from the loss are recorded; the rule runs where due
      -> metrics.jsonl              the check's figures (rule.CheckResult.metrics)

plan.StoreSpec is the one description of a data set that reads the store (built by training/data.py).
"""
from training.negatives.plan import BatchNegatives, PlannedNegatives, StoreSpec, fit_ranks
from training.negatives.rule import STATE_FILENAME, CheckResult, DynamicNegativeState
from training.negatives.runtime import NegativesRuntime, VersionFeed, broadcast_from_rank0
from training.negatives.source import StoreReader

__all__ = ["BatchNegatives", "CheckResult", "DynamicNegativeState", "NegativesRuntime", "PlannedNegatives",
           "STATE_FILENAME", "StoreReader", "StoreSpec", "VersionFeed", "broadcast_from_rank0", "fit_ranks"]

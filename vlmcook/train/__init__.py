"""Training: data (SFT records, mixture, batches, packing)."""

from vlmcook.train.data import (DataError, JsonlRecords, JsonlSource, ListRecords, Mixture, RecordSource, SkipLog,
                                batch_tokens, collate_batch, model_inputs, pack, pack_rows, record_to_messages)

__all__ = ["DataError", "JsonlRecords", "JsonlSource", "ListRecords", "Mixture", "RecordSource", "SkipLog",
           "batch_tokens", "collate_batch", "model_inputs", "pack", "pack_rows", "record_to_messages"]

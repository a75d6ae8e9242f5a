"""The audit: run modes (``modes.run``), the sharded scoring loop and its resumable score store,
metrics and calibration, the target's samples, dataset inference, the report and its plots."""

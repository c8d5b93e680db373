"""lstm_fast: a drop-in torch.nn.LSTM whose recurrence runs on fused kernels.

    import lstm_fast
    lstm = lstm_fast.LSTM(256, 256, batch_first=True)   # same arguments as torch.nn.LSTM
    y, (h, c) = lstm(x)

Backends: see lstm_fast.available_backends().
"""
from ._ops import load_prebuilt as _load_prebuilt
from .backends import BACKEND_NAMES, available_backends
from .function import LSTMRecurrence, lstm_layer, lstm_recurrence
from .inspection import Inspection, StepStates, inspect
from .nn import LSTM, LSTMCell
from .stream import Stream

# the prebuilt extension's ops exist from import on (a saved program calling them loads);
# lstm_fast::recurrence_forward and recurrence_backward are registered by .function
_load_prebuilt()

__all__ = ["LSTM", "LSTMCell", "Stream", "lstm_layer", "lstm_recurrence", "LSTMRecurrence",
           "available_backends", "BACKEND_NAMES", "inspect", "Inspection", "StepStates"]
__version__ = "0.1.0"

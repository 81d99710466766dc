"""convgru: spatiotemporal forecasting with encoder–forecaster ConvGRU/ConvLSTM stacks."""

__version__ = "0.1.0"

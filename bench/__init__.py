"""Benchmark suite of lstm_fast against torch.nn.LSTM: `python -m bench --help`, bench/README.md."""

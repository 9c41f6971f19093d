"""Stand-ins for what the pack meets outside, shared by the test suite (tests/) and the benchmarks (benchmarks/):
model folders in ModelScope's published layout written by the real producers with random weights
(model_folder.py), and a ModelScope hub on 127.0.0.1 that speaks what ModelScope's own client asks (hub.py).
The product never imports them."""

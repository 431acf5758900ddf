//! Load generators and fixtures shared by the benchmarks.

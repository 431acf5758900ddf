//! Shared helpers for the end-to-end tests: starting real peers on free loopback ports.

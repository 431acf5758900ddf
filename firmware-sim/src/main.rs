//! `millrace-sim`: the firmware simulator.
fn main() {}

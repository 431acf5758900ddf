//! Integration tests of the simulator against real peers: a tokio-modbus
//! client, `mbpoll`, a `mosquitto` broker and a `socat` pty pair. A missing
//! peer fails the test with the package to install; nothing is skipped.

#![allow(clippy::unwrap_used)]

mod cli;
mod load;
mod mbpoll;
mod modbus_tcp;
mod mqtt;
mod rtu;
mod util;

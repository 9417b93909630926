//! QUIC client for the relay protocol (being written).

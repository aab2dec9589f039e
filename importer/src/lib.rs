//! (being written)

pub mod cli;

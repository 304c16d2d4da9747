//! Integration tests, one binary (see tests/it/main.rs for why).

mod planner;
mod tracks;

//! The SQL of runs, their steps and teams, checked at compile time. Functions take an executor so
//! a caller can put a state change and its audit row in one transaction.

mod runs;
mod schedules;
mod teams;

pub use runs::*;
pub use schedules::*;
pub use teams::*;

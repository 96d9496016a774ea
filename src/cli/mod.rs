//! The `check` and `explain` commands: loading, linting and explaining a policy for an operator.
//! Both print to a writer so tests can drive them without a process.

pub mod check;
pub mod explain;
pub mod lint;

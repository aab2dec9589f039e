//! The import as an explicit phase machine, free of I/O so its rules are unit-tested.
//!
//! Upstream's `DataProcessor` loops over phases until `Complete`; we keep its names and its
//! loop guard, but our streaming engine fuses upstream's `TransferScratch` + `Convert`: for
//! disk images the `Convert` phase reads the source and writes the raw target in one pass.
//!
//! ```text
//!  disk image (http, s3, file, registry):  Info → Convert → Resize → Complete
//!  archive (http, s3, file):               Info → Transfer → Complete
//!  blank:                                  Info → Resize → Complete
//! ```
//!
//! `Resize` is where the final size, preallocation and the checksum verdict are settled; only
//! after it succeeds may anyone write "Import Complete".

use std::collections::BTreeSet;
use std::fmt;

/// A phase name, as logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// Probe the source (HEAD, manifest) and decide the plan.
    Info,
    /// Stream an archive into the data directory.
    Transfer,
    /// Stream, decode and write a disk image into the target.
    Convert,
    /// Settle the final size, preallocation and checksum; make the target durable.
    Resize,
    /// Done: the only phase after which success may be reported.
    Complete,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What is being imported, which fixes the route through the phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// A disk image converted to raw.
    DiskImage,
    /// A tar archive extracted into the data directory.
    Archive,
    /// A blank disk.
    Blank,
}

/// The phase after `phase` in `plan`, or `None` after `Complete`.
pub fn next(plan: Plan, phase: Phase) -> Option<Phase> {
    use Phase::*;
    match (plan, phase) {
        (_, Complete) => None,
        (Plan::DiskImage, Info) => Some(Convert),
        (Plan::DiskImage, Convert) => Some(Resize),
        (Plan::Archive, Info) => Some(Transfer),
        (Plan::Archive, Transfer) => Some(Complete),
        (Plan::Blank, Info) => Some(Resize),
        (Plan::DiskImage | Plan::Blank, Resize) => Some(Complete),
        (Plan::Archive, Resize) => None,
        // Phases that do not belong to the plan: go straight to an error via `Machine`.
        (Plan::DiskImage, Transfer) | (Plan::Archive, Convert) | (Plan::Blank, _) => None,
    }
}

/// Walks a plan, refusing loops and phases that do not belong to it.
#[derive(Debug)]
pub struct Machine {
    plan: Plan,
    current: Phase,
    visited: BTreeSet<Phase>,
}

/// A broken walk (a bug, reported instead of looping or claiming success).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhaseError(pub String);

impl Machine {
    /// Start at `Info`.
    pub fn new(plan: Plan) -> Machine {
        Machine {
            plan,
            current: Phase::Info,
            visited: BTreeSet::from([Phase::Info]),
        }
    }

    /// The phase being executed.
    pub fn current(&self) -> Phase {
        self.current
    }

    /// The plan.
    pub fn plan(&self) -> Plan {
        self.plan
    }

    /// The executor of the current phase succeeded: move on.
    pub fn advance(&mut self) -> Result<Phase, PhaseError> {
        let next = next(self.plan, self.current).ok_or_else(|| {
            PhaseError(format!(
                "no phase after {} in {:?}",
                self.current, self.plan
            ))
        })?;
        if !self.visited.insert(next) {
            return Err(PhaseError(format!("loop detected on phase {next}")));
        }
        self.current = next;
        Ok(next)
    }

    /// True once `Complete` is reached.
    pub fn is_complete(&self) -> bool {
        self.current == Phase::Complete
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walk(plan: Plan) -> Vec<Phase> {
        let mut m = Machine::new(plan);
        let mut seen = vec![m.current()];
        while !m.is_complete() {
            seen.push(m.advance().unwrap());
        }
        seen
    }

    #[test]
    fn disk_images_convert_then_resize() {
        use Phase::*;
        assert_eq!(walk(Plan::DiskImage), [Info, Convert, Resize, Complete]);
    }

    #[test]
    fn archives_skip_conversion_and_resize() {
        use Phase::*;
        assert_eq!(walk(Plan::Archive), [Info, Transfer, Complete]);
    }

    #[test]
    fn blank_only_resizes() {
        use Phase::*;
        assert_eq!(walk(Plan::Blank), [Info, Resize, Complete]);
    }

    #[test]
    fn nothing_follows_complete() {
        let mut m = Machine::new(Plan::Blank);
        m.advance().unwrap();
        m.advance().unwrap();
        assert!(m.is_complete());
        assert!(m.advance().is_err());
    }

    #[test]
    fn every_plan_passes_its_work_phase_before_complete() {
        for (plan, work) in [
            (Plan::DiskImage, Phase::Convert),
            (Plan::Archive, Phase::Transfer),
            (Plan::Blank, Phase::Resize),
        ] {
            let phases = walk(plan);
            let w = phases.iter().position(|p| *p == work).unwrap();
            let c = phases.iter().position(|p| *p == Phase::Complete).unwrap();
            assert!(w < c, "{plan:?}");
        }
    }

    #[test]
    fn foreign_phases_have_no_successor() {
        assert_eq!(next(Plan::Archive, Phase::Convert), None);
        assert_eq!(next(Plan::Blank, Phase::Transfer), None);
        assert_eq!(next(Plan::DiskImage, Phase::Transfer), None);
    }
}

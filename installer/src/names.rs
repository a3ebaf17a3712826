//! Stage names as an operator types them: every command that takes a deployed stage's name
//! (`rollback`, `remove`, `fix-symlinks`, `verify`, `repair`) accepts the whole name or a
//! unique prefix of it (`stage-3` for `stage-3-openflow`), as the users' documents write
//! them. A prefix that fits several deployed stages is refused with all of them listed.

use anyhow::Result;

use formats::StageName;

use crate::error::Usage;
use crate::ops::Ctx;

/// The longest text taken as a stage name or prefix (a stage name has at most 128 bytes).
const MAX_TYPED: usize = 128;

/// The deployed stage `typed` names: the stage of exactly that name, else the one stage
/// whose name starts with it. Unknown and ambiguous text is a usage error (exit 2) that
/// names the candidates.
pub fn resolve<'a>(deployed: impl IntoIterator<Item = &'a StageName>, typed: &str) -> Result<StageName, Usage> {
    let shown: String = typed.chars().take(MAX_TYPED).collect();
    if typed.is_empty() || typed.len() > MAX_TYPED {
        return Err(Usage(format!(
            "{shown:?} is not a stage name: a name or prefix has 1 to {MAX_TYPED} bytes (see `op-dbus-stage list`)"
        )));
    }
    let mut candidates: Vec<&StageName> = Vec::new();
    for name in deployed {
        if name.as_str() == typed {
            return Ok(name.clone());
        }
        if name.as_str().starts_with(typed) {
            candidates.push(name);
        }
    }
    candidates.sort();
    match candidates.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(Usage(format!("{typed} is not deployed (see `op-dbus-stage list`)"))),
        many => Err(Usage(format!(
            "{typed} is ambiguous: it starts the names of {} deployed stages ({}); give more of the name",
            many.len(),
            many.iter().map(|n| n.as_str()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// [`resolve`] against the stages deployed on the host of `ctx`.
pub fn deployed(ctx: &Ctx, typed: &str) -> Result<StageName> {
    let state = ctx.state()?;
    Ok(resolve(state.stages.keys(), typed)?)
}

#[cfg(test)]
mod tests {
    use super::resolve;
    use formats::StageName;

    fn names(list: &[&str]) -> Vec<StageName> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn a_whole_name_wins_over_longer_names_it_starts() {
        let d = names(&["stage-3", "stage-3-openflow"]);
        assert_eq!(resolve(&d, "stage-3").unwrap().as_str(), "stage-3");
        assert_eq!(resolve(&d, "stage-3-o").unwrap().as_str(), "stage-3-openflow");
    }

    #[test]
    fn a_unique_prefix_names_its_stage() {
        let d = names(&["stage-1-core-dbus", "stage-2-netmaker", "stage-3-openflow"]);
        assert_eq!(resolve(&d, "stage-3").unwrap().as_str(), "stage-3-openflow");
        let e = resolve(&d, "s").unwrap_err().0;
        assert!(e.contains("3 deployed stages (stage-1-core-dbus, stage-2-netmaker, stage-3-openflow)"), "{e}");
    }

    #[test]
    fn an_ambiguous_prefix_lists_the_candidates_in_order() {
        let d = names(&["stage-30-x", "app", "stage-3-openflow"]);
        let e = resolve(&d, "stage-3").unwrap_err().0;
        assert!(e.contains("ambiguous") && e.contains("2 deployed stages (stage-3-openflow, stage-30-x)"), "{e}");
    }

    #[test]
    fn unknown_empty_and_overlong_text_is_refused() {
        let d = names(&["app"]);
        assert!(resolve(&d, "web").unwrap_err().0.contains("web is not deployed"));
        assert!(resolve(&d, "").unwrap_err().0.contains("1 to 128 bytes"));
        let long = "a".repeat(129);
        let e = resolve(&d, &long).unwrap_err().0;
        assert!(e.contains("1 to 128 bytes") && e.len() < 300, "{e}");
        // Text that is no valid name at all is simply not deployed.
        assert!(resolve(&d, "../app").unwrap_err().0.contains("is not deployed"));
        assert!(resolve(&[], "app").unwrap_err().0.contains("app is not deployed"));
    }
}

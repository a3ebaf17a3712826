//! `deploy --with-deps`: the stages the images being deployed depend on, taken from the
//! host's own store and deployed in the same transaction. A dependency already satisfied by
//! the batch or by the deployed stage of that name needs nothing; otherwise the highest
//! stored version that matches the requirement joins the batch, and its own dependencies
//! are looked at in turn.

use std::collections::BTreeMap;

use anyhow::Result;

use formats::manifest::Dependency;
use formats::{Reference, StageName, Version};

use crate::error::Refused;

/// A stage in the batch: its name, version and dependencies.
pub type Member = (StageName, Version, Vec<Dependency>);

/// The images to add to `batch` so that every dependency of its members is satisfied by
/// the batch, by `deployed` (the active version per stage), or by what is added: the
/// highest matching version of `stored`. One round: the members' own dependencies, not
/// those of what is added (the caller adds them and asks again). A dependency nothing
/// satisfies is refused (exit 4) with what to bring.
pub fn missing(
    batch: &[Member],
    deployed: &BTreeMap<StageName, Version>,
    stored: &[Reference],
) -> Result<Vec<Reference>> {
    let mut add: Vec<Reference> = Vec::new();
    for (name, version, deps) in batch {
        for dep in deps {
            let in_batch = batch.iter().any(|(n, v, _)| *n == dep.stage && dep.matches(v));
            let active = deployed.get(&dep.stage).is_some_and(|v| dep.matches(v));
            let added = add.iter().any(|r| r.name == dep.stage && dep.matches(&r.version));
            if in_batch || active || added || dep.stage == *name {
                continue;
            }
            // Another version of a stage already in the batch cannot join it.
            if batch.iter().any(|(n, _, _)| *n == dep.stage) || add.iter().any(|r| r.name == dep.stage) {
                return Err(Refused::Dependency(format!(
                    "{name}:{version} needs {dep}, and the version of {} being deployed does not match",
                    dep.stage
                ))
                .into());
            }
            let best =
                stored.iter().filter(|r| r.name == dep.stage && dep.matches(&r.version)).max_by_key(|r| &r.version);
            match best {
                Some(r) => add.push(r.clone()),
                None => {
                    return Err(Refused::Dependency(format!(
                        "{name}:{version} needs {dep}, which is not deployed and has no matching image in the local \
                         store: bring one (`op-dbus-stage receive FILE.oci.tar`) and deploy again"
                    ))
                    .into());
                }
            }
        }
    }
    Ok(add)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use formats::manifest::Dependency;
    use formats::{Reference, StageName, Version};

    use super::{Member, missing};

    fn dep(text: &str) -> Dependency {
        Dependency::parse(text).unwrap()
    }

    fn member(name: &str, version: &str, deps: &[&str]) -> Member {
        (name.parse().unwrap(), version.parse().unwrap(), deps.iter().map(|d| dep(d)).collect())
    }

    fn refs(list: &[&str]) -> Vec<Reference> {
        list.iter().map(|r| r.parse().unwrap()).collect()
    }

    fn versions(list: &[(&str, &str)]) -> BTreeMap<StageName, Version> {
        list.iter().map(|(n, v)| (n.parse().unwrap(), v.parse().unwrap())).collect()
    }

    #[test]
    fn the_highest_matching_stored_version_joins_and_satisfied_ones_do_not() {
        let stored = refs(&["core:1.0.0", "core:1.4.0", "core:2.0.0", "net-x:1.0.0"]);
        let batch = [member("flow", "1.0.0", &["core >=1.0, <2.0", "net-x"])];
        let add = missing(&batch, &BTreeMap::new(), &stored).unwrap();
        assert_eq!(add, refs(&["core:1.4.0", "net-x:1.0.0"]));
        // Satisfied by what is deployed, or by the batch itself: nothing added.
        let add = missing(&batch, &versions(&[("core", "1.2.0")]), &stored).unwrap();
        assert_eq!(add, refs(&["net-x:1.0.0"]));
        let batch = [member("flow", "1.0.0", &["core >=1.0, <2.0"]), member("core", "1.1.0", &[])];
        assert!(missing(&batch, &BTreeMap::new(), &stored).unwrap().is_empty());
    }

    #[test]
    fn a_deployed_version_that_does_not_match_is_upgraded_from_the_store() {
        let stored = refs(&["core:2.1.0"]);
        let batch = [member("flow", "1.0.0", &["core >=2"])];
        assert_eq!(missing(&batch, &versions(&[("core", "1.0.0")]), &stored).unwrap(), stored);
    }

    #[test]
    fn what_nothing_satisfies_is_refused_with_exit_4() {
        let batch = [member("flow", "1.0.0", &["core >=3"])];
        let e = missing(&batch, &BTreeMap::new(), &refs(&["core:2.0.0"])).unwrap_err();
        assert!(e.downcast_ref::<crate::error::Refused>().is_some());
        assert!(e.to_string().contains("needs core >=3") && e.to_string().contains("receive"), "{e}");
        // The batch holds another version of it: refused, not a second one added.
        let batch = [member("flow", "1.0.0", &["core >=3"]), member("core", "2.0.0", &[])];
        let e = missing(&batch, &BTreeMap::new(), &refs(&["core:3.0.0"])).unwrap_err().to_string();
        assert!(e.contains("does not match"), "{e}");
    }
}

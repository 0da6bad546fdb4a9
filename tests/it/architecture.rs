//! ARCHITECTURE.md checked against the code: the arrows between the product crate's top-level
//! modules go one way (no circle, and only the arrows the map allows), the domain names no
//! framework or backend type, the HTTP layer's handlers sit above extraction and authentication,
//! and every validation code the domain can raise is in the problem catalogue.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without comments and without its `#[cfg(test)]` module (tests may reach
/// across layers to set things up).
fn code_of(path: &Path) -> String {
    let src = std::fs::read_to_string(path).unwrap();
    let src = match src.find("#[cfg(test)]") {
        Some(i) => &src[..i],
        None => &src[..],
    };
    src.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `crate::<name>` references in `code`, including the names inside `use crate::{a, b::c}`.
fn crate_refs(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(inner) = rest.strip_prefix('{') {
            let end = inner.find('}').unwrap_or(inner.len());
            for part in inner[..end].split(',') {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

fn src() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The top-level module a file of `src/` belongs to.
fn top_module(path: &Path) -> String {
    let rel = path.strip_prefix(src()).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

/// Which top-level module may use which: the arrows of ARCHITECTURE.md.
const ALLOWED: &[(&str, &[&str])] = &[
    (
        "app",
        &[
            "config",
            "crypto",
            "d1",
            "domain",
            "egress",
            "http",
            "observability",
            "storage",
            "telemetry",
            "webhook_sender",
        ],
    ),
    ("http", &["config", "domain", "observability", "telemetry"]),
    ("storage", &["domain", "observability"]),
    ("d1", &["config", "domain", "observability"]),
    ("webhook_sender", &["domain", "egress"]),
    ("domain", &["crypto", "egress", "observability"]),
    ("config", &["crypto"]),
    ("telemetry", &["config"]),
    ("crypto", &[]),
    ("egress", &[]),
    ("observability", &[]),
];

#[test]
fn top_level_modules_only_use_the_arrows_of_the_map() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let from = top_module(f);
        if from == "lib" || from == "main" {
            continue;
        }
        for to in crate_refs(&code_of(f)) {
            if to != from {
                edges.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    let mut wrong = Vec::new();
    for (from, tos) in &edges {
        let Some((_, allowed)) = ALLOWED.iter().find(|(m, _)| m == from) else {
            wrong.push(format!(
                "{from}: a top-level module missing from ARCHITECTURE.md's map"
            ));
            continue;
        };
        for to in tos {
            if !allowed.contains(&to.as_str()) {
                wrong.push(format!("{from} -> {to}"));
            }
        }
    }
    assert!(wrong.is_empty(), "arrows not in the map: {wrong:?}");
}

#[test]
fn the_map_has_no_circle() {
    // A depth-first walk of ALLOWED: the map itself must be one way.
    fn visit<'a>(m: &'a str, path: &mut Vec<&'a str>) {
        assert!(!path.contains(&m), "circle in the map: {path:?} -> {m}");
        path.push(m);
        if let Some((_, tos)) = ALLOWED.iter().find(|(n, _)| *n == m) {
            for t in *tos {
                visit(t, path);
            }
        }
        path.pop();
    }
    for (m, _) in ALLOWED {
        visit(m, &mut Vec::new());
    }
}

#[test]
fn the_domain_names_no_framework_or_backend_type() {
    let mut files = Vec::new();
    rust_files(&src().join("domain"), &mut files);
    for f in files {
        let code = code_of(&f);
        for banned in [
            "axum::", "hyper::", "redis::", "redb::", "tower::", "utoipa::",
        ] {
            assert!(
                !code.contains(banned),
                "{} uses {banned}: the domain knows no framework or backend type",
                f.display()
            );
        }
    }
}

#[test]
fn http_handlers_sit_above_extraction_and_authentication() {
    // Nothing below the handlers (and no handler) reaches the router, the OpenAPI document or
    // another layer's handlers through `crate::http::handlers` except the router and openapi.rs.
    let mut files = Vec::new();
    rust_files(&src().join("http"), &mut files);
    for f in files {
        let rel = f.strip_prefix(src().join("http")).unwrap().to_owned();
        let code = code_of(&f);
        let top = rel.to_string_lossy();
        if top == "mod.rs" || top == "openapi.rs" || top.starts_with("handlers") {
            continue;
        }
        assert!(
            !code.contains("handlers::")
                && !code.contains("http::openapi")
                && !code.contains("super::openapi"),
            "src/http/{top} is below the handlers but uses them or the OpenAPI document"
        );
    }
}

#[test]
fn every_domain_validation_code_is_in_the_problem_catalogue() {
    let mut files = Vec::new();
    rust_files(&src().join("domain"), &mut files);
    let mut missing = Vec::new();
    let mut seen = 0;
    for f in files {
        let code = code_of(&f);
        // `code: "..."` literals of validation errors, and the `invalid("...")` helpers. D1's
        // own error codes (`ProviderError::Rejected { code: "...".into() }`) are not ours.
        for marker in ["code: \"", "invalid(\""] {
            let mut rest = code.as_str();
            while let Some(i) = rest.find(marker) {
                rest = &rest[i + marker.len()..];
                let name: String = rest.chars().take_while(|c| *c != '"').collect();
                if rest[name.len()..].starts_with("\".into()") {
                    continue;
                }
                seen += 1;
                if tokengate::http::problem::codes::find(
                    axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                    &name,
                )
                .is_none()
                {
                    missing.push(name);
                }
            }
        }
    }
    assert!(
        seen > 5,
        "the scan found too few codes ({seen}): is it still reading the domain?"
    );
    assert!(
        missing.is_empty(),
        "validation codes missing from the catalogue: {missing:?}"
    );
}

//! Embeds the web app (`web/`) in the binary: every file, its gzip form (compressed here, at
//! build time, so the server never compresses on a request), a content type and an ETag.
//! The service worker's `__BUILD__` becomes a hash of all files, so a new build replaces the
//! app shell browsers keep offline.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// 64-bit FNV-1a: stable across builds and toolchains (unlike std's hasher).
fn fnv(bytes: &[u8], mut h: u64) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}
const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html;charset=utf-8",
        Some("js") => "text/javascript;charset=utf-8",
        Some("css") => "text/css;charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("webmanifest") => "application/manifest+json",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    }
}

fn walk(dir: &Path, base: &Path, out: &mut Vec<(String, PathBuf)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read web/")
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            walk(&path, base, out);
        } else {
            let rel = path
                .strip_prefix(base)
                .expect("inside web/")
                .to_string_lossy()
                .replace('\\', "/");
            // Only what browsers load: licences, notes and checksums stay in the source tree.
            let served = [".html", ".js", ".css", ".svg", ".png", ".webmanifest"];
            if served.iter().any(|ext| rel.ends_with(ext)) {
                out.push((rel, path));
            }
        }
    }
}

fn main() {
    let web = Path::new(env!("CARGO_MANIFEST_DIR")).join("web");
    println!("cargo:rerun-if-changed={}", web.display());
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("web");
    std::fs::create_dir_all(&out_dir).expect("out dir");
    let mut files = Vec::new();
    walk(&web, &web, &mut files);
    let mut build = FNV_START;
    let mut contents = Vec::new();
    for (rel, path) in &files {
        println!("cargo:rerun-if-changed={}", path.display());
        let bytes = std::fs::read(path).expect("read asset");
        build = fnv(rel.as_bytes(), fnv(&bytes, build));
        contents.push(bytes);
    }
    let build = format!("{build:016x}");
    let mut table = String::from("&[\n");
    for (i, ((rel, _), mut bytes)) in files.iter().zip(contents).enumerate() {
        if rel == "sw.js" {
            bytes = String::from_utf8(bytes)
                .expect("sw.js is UTF-8")
                .replace("__BUILD__", &build)
                .into_bytes();
        }
        let raw = out_dir.join(format!("{i}.raw"));
        std::fs::write(&raw, &bytes).expect("write asset");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&bytes).expect("gzip");
        let gz = gz.finish().expect("gzip");
        // Already compressed formats (PNG) gain nothing: served as they are.
        let gzip = if gz.len() * 10 < bytes.len() * 9 {
            let path = out_dir.join(format!("{i}.gz"));
            std::fs::write(&path, &gz).expect("write gzip");
            format!("Some(include_bytes!({:?}))", path.display().to_string())
        } else {
            "None".to_owned()
        };
        let etag = format!("\"{:016x}\"", fnv(&bytes, FNV_START));
        writeln!(
            table,
            "    Asset {{ path: {rel:?}, content_type: {:?}, body: include_bytes!({:?}), gzip: {gzip}, etag: {etag:?} }},",
            content_type(rel),
            raw.display().to_string(),
        )
        .expect("write");
    }
    table.push(']');
    let code =
        format!("/// Every file of the web app.\npub(crate) static ASSETS: &[Asset] = {table};\n");
    std::fs::write(
        PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("web_assets.rs"),
        code,
    )
    .expect("write web_assets.rs");
}

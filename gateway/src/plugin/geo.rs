//! The database behind the `geo` host import: a MaxMind-format (`.mmdb`)
//! file named by `[geo] database`, read whole into memory at load.
//!
//! Two record shapes are understood, so both kinds of freely available
//! databases work:
//! - GeoIP2 / GeoLite2 / DB-IP (`country.iso_code`, `continent.code`);
//! - country-only databases such as ip-location-db's (`country_code`), where
//!   the continent comes from [`continent_of`].

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::continents::continent_of;

/// An open geo database.
pub(crate) struct GeoDatabase {
    path: PathBuf,
    reader: maxminddb::Reader<Vec<u8>>,
}

impl std::fmt::Debug for GeoDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeoDatabase")
            .field("path", &self.path)
            .field("type", &self.reader.metadata.database_type)
            .finish_non_exhaustive()
    }
}

/// Plugins are compared by their spec on reload; two specs with the same
/// database file are the same.
impl PartialEq for GeoDatabase {
    fn eq(&self, other: &GeoDatabase) -> bool {
        self.path == other.path
            && self.reader.metadata.build_epoch == other.reader.metadata.build_epoch
    }
}

impl Eq for GeoDatabase {}

/// What a lookup found; a field is `None` when the database does not know it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Place {
    /// ISO 3166-1 alpha-2, uppercase.
    pub(crate) country: Option<String>,
    /// Two-letter continent code.
    pub(crate) continent: Option<String>,
}

/// The fields read from a record, in either shape.
#[derive(Deserialize)]
struct Record<'a> {
    #[serde(borrow)]
    country: Option<Country<'a>>,
    #[serde(borrow)]
    registered_country: Option<Country<'a>>,
    #[serde(borrow)]
    continent: Option<Continent<'a>>,
    country_code: Option<&'a str>,
}

#[derive(Deserialize)]
struct Country<'a> {
    iso_code: Option<&'a str>,
}

#[derive(Deserialize)]
struct Continent<'a> {
    code: Option<&'a str>,
}

impl GeoDatabase {
    /// Opens the database at `path` and checks that it answers lookups.
    pub(crate) fn open(path: &Path) -> Result<GeoDatabase, String> {
        let reader = maxminddb::Reader::open_readfile(path).map_err(|e| match e {
            maxminddb::MaxMindDbError::Io(io) => format!("cannot read {}: {io}", path.display()),
            other => format!(
                "{} is not a MaxMind-format database: {other}",
                path.display()
            ),
        })?;
        let database = GeoDatabase {
            path: path.to_path_buf(),
            reader,
        };
        // A lookup walks the search tree and decodes a record: a file that
        // parses but is cut short or corrupt fails here rather than later.
        database
            .reader
            .lookup(IpAddr::from([8, 8, 8, 8]))
            .and_then(|found| found.decode::<Record<'_>>().map(|_| ()))
            .map_err(|e| format!("{}: lookups fail: {e}", path.display()))?;
        Ok(database)
    }

    /// Where `ip` is. An address the database does not cover, or a record
    /// it cannot decode, is unknown.
    pub(crate) fn lookup(&self, ip: IpAddr) -> Place {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            IpAddr::V4(_) => ip,
        };
        let Ok(found) = self.reader.lookup(ip) else {
            return Place::default();
        };
        let Ok(Some(record)) = found.decode::<Record<'_>>() else {
            return Place::default();
        };
        let country = record
            .country
            .and_then(|c| c.iso_code)
            .or(record.country_code)
            .or(record.registered_country.and_then(|c| c.iso_code))
            .filter(|code| code.len() == 2)
            .map(str::to_ascii_uppercase);
        let continent = record
            .continent
            .and_then(|c| c.code)
            .map(str::to_string)
            .or_else(|| {
                country
                    .as_deref()
                    .and_then(continent_of)
                    .map(str::to_string)
            });
        Place { country, continent }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundled() -> GeoDatabase {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/geo/geo-whois-asn-country.mmdb");
        GeoDatabase::open(&path).unwrap()
    }

    #[test]
    fn the_bundled_database_knows_countries_and_continents() {
        let db = bundled();
        let place = db.lookup("8.8.8.8".parse().unwrap());
        assert_eq!(place.country.as_deref(), Some("US"));
        assert_eq!(place.continent.as_deref(), Some("NA"));
        let mapped = db.lookup("::ffff:8.8.8.8".parse().unwrap());
        assert_eq!(mapped, place, "IPv4-mapped addresses read as IPv4");
        let private = db.lookup("10.1.2.3".parse().unwrap());
        assert_eq!(private, Place::default());
    }

    #[test]
    fn a_file_that_is_not_a_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.mmdb");
        std::fs::write(&path, b"not a database").unwrap();
        let error = GeoDatabase::open(&path).unwrap_err();
        assert!(error.contains("not a MaxMind-format database"), "{error}");
        let error = GeoDatabase::open(&dir.path().join("missing.mmdb")).unwrap_err();
        assert!(error.contains("cannot read"), "{error}");
    }
}

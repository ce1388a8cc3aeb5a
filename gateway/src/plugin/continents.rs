//! The continent of a country, for geo databases that know only countries
//! (such as the bundled `data/geo` one): `geo.lookup` answers the continent
//! from the country's code.
//!
//! The table is GeoNames' `countryInfo.txt` (its "Continent" column), which is
//! where MaxMind's GeoLite2 and GeoIP2 take their continents from, so a
//! country-only database answers what a City or Country database would. Some
//! assignments are a convention rather than geography, and follow GeoNames:
//! Russia is in Europe, Turkey, Georgia, Armenia and Azerbaijan in Asia,
//! Cyprus in Europe, Egypt in Africa, Panama and the Caribbean in North
//! America, and the uninhabited southern islands (Bouvet, Heard and McDonald,
//! South Georgia, the French Southern Territories) in Antarctica.
//!
//! Every ISO 3166-1 alpha-2 code assigned today is here, plus `XK` (Kosovo,
//! user-assigned, as GeoNames and MaxMind use it). Withdrawn codes (`AN`,
//! `CS`) and the registries' pseudo-countries (`EU`, `AP`) have no continent.

// Two-letter continent codes, as MaxMind names them.
const AFRICA: &str = "AF";
const ANTARCTICA: &str = "AN";
const ASIA: &str = "AS";
const EUROPE: &str = "EU";
const NORTH_AMERICA: &str = "NA";
const OCEANIA: &str = "OC";
const SOUTH_AMERICA: &str = "SA";

/// `(country, continent)`, sorted by country code for a binary search.
const CONTINENTS: [(&str, &str); 250] = [
    ("AD", EUROPE),        // Andorra
    ("AE", ASIA),          // United Arab Emirates
    ("AF", ASIA),          // Afghanistan
    ("AG", NORTH_AMERICA), // Antigua and Barbuda
    ("AI", NORTH_AMERICA), // Anguilla
    ("AL", EUROPE),        // Albania
    ("AM", ASIA),          // Armenia
    ("AO", AFRICA),        // Angola
    ("AQ", ANTARCTICA),    // Antarctica
    ("AR", SOUTH_AMERICA), // Argentina
    ("AS", OCEANIA),       // American Samoa
    ("AT", EUROPE),        // Austria
    ("AU", OCEANIA),       // Australia
    ("AW", NORTH_AMERICA), // Aruba
    ("AX", EUROPE),        // Aland Islands
    ("AZ", ASIA),          // Azerbaijan
    ("BA", EUROPE),        // Bosnia and Herzegovina
    ("BB", NORTH_AMERICA), // Barbados
    ("BD", ASIA),          // Bangladesh
    ("BE", EUROPE),        // Belgium
    ("BF", AFRICA),        // Burkina Faso
    ("BG", EUROPE),        // Bulgaria
    ("BH", ASIA),          // Bahrain
    ("BI", AFRICA),        // Burundi
    ("BJ", AFRICA),        // Benin
    ("BL", NORTH_AMERICA), // Saint Barthelemy
    ("BM", NORTH_AMERICA), // Bermuda
    ("BN", ASIA),          // Brunei
    ("BO", SOUTH_AMERICA), // Bolivia
    ("BQ", NORTH_AMERICA), // Bonaire, Saint Eustatius and Saba
    ("BR", SOUTH_AMERICA), // Brazil
    ("BS", NORTH_AMERICA), // Bahamas
    ("BT", ASIA),          // Bhutan
    ("BV", ANTARCTICA),    // Bouvet Island
    ("BW", AFRICA),        // Botswana
    ("BY", EUROPE),        // Belarus
    ("BZ", NORTH_AMERICA), // Belize
    ("CA", NORTH_AMERICA), // Canada
    ("CC", ASIA),          // Cocos Islands
    ("CD", AFRICA),        // Democratic Republic of the Congo
    ("CF", AFRICA),        // Central African Republic
    ("CG", AFRICA),        // Republic of the Congo
    ("CH", EUROPE),        // Switzerland
    ("CI", AFRICA),        // Ivory Coast
    ("CK", OCEANIA),       // Cook Islands
    ("CL", SOUTH_AMERICA), // Chile
    ("CM", AFRICA),        // Cameroon
    ("CN", ASIA),          // China
    ("CO", SOUTH_AMERICA), // Colombia
    ("CR", NORTH_AMERICA), // Costa Rica
    ("CU", NORTH_AMERICA), // Cuba
    ("CV", AFRICA),        // Cabo Verde
    ("CW", NORTH_AMERICA), // Curacao
    ("CX", OCEANIA),       // Christmas Island
    ("CY", EUROPE),        // Cyprus
    ("CZ", EUROPE),        // Czechia
    ("DE", EUROPE),        // Germany
    ("DJ", AFRICA),        // Djibouti
    ("DK", EUROPE),        // Denmark
    ("DM", NORTH_AMERICA), // Dominica
    ("DO", NORTH_AMERICA), // Dominican Republic
    ("DZ", AFRICA),        // Algeria
    ("EC", SOUTH_AMERICA), // Ecuador
    ("EE", EUROPE),        // Estonia
    ("EG", AFRICA),        // Egypt
    ("EH", AFRICA),        // Western Sahara
    ("ER", AFRICA),        // Eritrea
    ("ES", EUROPE),        // Spain
    ("ET", AFRICA),        // Ethiopia
    ("FI", EUROPE),        // Finland
    ("FJ", OCEANIA),       // Fiji
    ("FK", SOUTH_AMERICA), // Falkland Islands
    ("FM", OCEANIA),       // Micronesia
    ("FO", EUROPE),        // Faroe Islands
    ("FR", EUROPE),        // France
    ("GA", AFRICA),        // Gabon
    ("GB", EUROPE),        // United Kingdom
    ("GD", NORTH_AMERICA), // Grenada
    ("GE", ASIA),          // Georgia
    ("GF", SOUTH_AMERICA), // French Guiana
    ("GG", EUROPE),        // Guernsey
    ("GH", AFRICA),        // Ghana
    ("GI", EUROPE),        // Gibraltar
    ("GL", NORTH_AMERICA), // Greenland
    ("GM", AFRICA),        // Gambia
    ("GN", AFRICA),        // Guinea
    ("GP", NORTH_AMERICA), // Guadeloupe
    ("GQ", AFRICA),        // Equatorial Guinea
    ("GR", EUROPE),        // Greece
    ("GS", ANTARCTICA),    // South Georgia and the South Sandwich Islands
    ("GT", NORTH_AMERICA), // Guatemala
    ("GU", OCEANIA),       // Guam
    ("GW", AFRICA),        // Guinea-Bissau
    ("GY", SOUTH_AMERICA), // Guyana
    ("HK", ASIA),          // Hong Kong
    ("HM", ANTARCTICA),    // Heard Island and McDonald Islands
    ("HN", NORTH_AMERICA), // Honduras
    ("HR", EUROPE),        // Croatia
    ("HT", NORTH_AMERICA), // Haiti
    ("HU", EUROPE),        // Hungary
    ("ID", ASIA),          // Indonesia
    ("IE", EUROPE),        // Ireland
    ("IL", ASIA),          // Israel
    ("IM", EUROPE),        // Isle of Man
    ("IN", ASIA),          // India
    ("IO", ASIA),          // British Indian Ocean Territory
    ("IQ", ASIA),          // Iraq
    ("IR", ASIA),          // Iran
    ("IS", EUROPE),        // Iceland
    ("IT", EUROPE),        // Italy
    ("JE", EUROPE),        // Jersey
    ("JM", NORTH_AMERICA), // Jamaica
    ("JO", ASIA),          // Jordan
    ("JP", ASIA),          // Japan
    ("KE", AFRICA),        // Kenya
    ("KG", ASIA),          // Kyrgyzstan
    ("KH", ASIA),          // Cambodia
    ("KI", OCEANIA),       // Kiribati
    ("KM", AFRICA),        // Comoros
    ("KN", NORTH_AMERICA), // Saint Kitts and Nevis
    ("KP", ASIA),          // North Korea
    ("KR", ASIA),          // South Korea
    ("KW", ASIA),          // Kuwait
    ("KY", NORTH_AMERICA), // Cayman Islands
    ("KZ", ASIA),          // Kazakhstan
    ("LA", ASIA),          // Laos
    ("LB", ASIA),          // Lebanon
    ("LC", NORTH_AMERICA), // Saint Lucia
    ("LI", EUROPE),        // Liechtenstein
    ("LK", ASIA),          // Sri Lanka
    ("LR", AFRICA),        // Liberia
    ("LS", AFRICA),        // Lesotho
    ("LT", EUROPE),        // Lithuania
    ("LU", EUROPE),        // Luxembourg
    ("LV", EUROPE),        // Latvia
    ("LY", AFRICA),        // Libya
    ("MA", AFRICA),        // Morocco
    ("MC", EUROPE),        // Monaco
    ("MD", EUROPE),        // Moldova
    ("ME", EUROPE),        // Montenegro
    ("MF", NORTH_AMERICA), // Saint Martin
    ("MG", AFRICA),        // Madagascar
    ("MH", OCEANIA),       // Marshall Islands
    ("MK", EUROPE),        // North Macedonia
    ("ML", AFRICA),        // Mali
    ("MM", ASIA),          // Myanmar
    ("MN", ASIA),          // Mongolia
    ("MO", ASIA),          // Macao
    ("MP", OCEANIA),       // Northern Mariana Islands
    ("MQ", NORTH_AMERICA), // Martinique
    ("MR", AFRICA),        // Mauritania
    ("MS", NORTH_AMERICA), // Montserrat
    ("MT", EUROPE),        // Malta
    ("MU", AFRICA),        // Mauritius
    ("MV", ASIA),          // Maldives
    ("MW", AFRICA),        // Malawi
    ("MX", NORTH_AMERICA), // Mexico
    ("MY", ASIA),          // Malaysia
    ("MZ", AFRICA),        // Mozambique
    ("NA", AFRICA),        // Namibia
    ("NC", OCEANIA),       // New Caledonia
    ("NE", AFRICA),        // Niger
    ("NF", OCEANIA),       // Norfolk Island
    ("NG", AFRICA),        // Nigeria
    ("NI", NORTH_AMERICA), // Nicaragua
    ("NL", EUROPE),        // The Netherlands
    ("NO", EUROPE),        // Norway
    ("NP", ASIA),          // Nepal
    ("NR", OCEANIA),       // Nauru
    ("NU", OCEANIA),       // Niue
    ("NZ", OCEANIA),       // New Zealand
    ("OM", ASIA),          // Oman
    ("PA", NORTH_AMERICA), // Panama
    ("PE", SOUTH_AMERICA), // Peru
    ("PF", OCEANIA),       // French Polynesia
    ("PG", OCEANIA),       // Papua New Guinea
    ("PH", ASIA),          // Philippines
    ("PK", ASIA),          // Pakistan
    ("PL", EUROPE),        // Poland
    ("PM", NORTH_AMERICA), // Saint Pierre and Miquelon
    ("PN", OCEANIA),       // Pitcairn
    ("PR", NORTH_AMERICA), // Puerto Rico
    ("PS", ASIA),          // Palestinian Territory
    ("PT", EUROPE),        // Portugal
    ("PW", OCEANIA),       // Palau
    ("PY", SOUTH_AMERICA), // Paraguay
    ("QA", ASIA),          // Qatar
    ("RE", AFRICA),        // Reunion
    ("RO", EUROPE),        // Romania
    ("RS", EUROPE),        // Serbia
    ("RU", EUROPE),        // Russia
    ("RW", AFRICA),        // Rwanda
    ("SA", ASIA),          // Saudi Arabia
    ("SB", OCEANIA),       // Solomon Islands
    ("SC", AFRICA),        // Seychelles
    ("SD", AFRICA),        // Sudan
    ("SE", EUROPE),        // Sweden
    ("SG", ASIA),          // Singapore
    ("SH", AFRICA),        // Saint Helena
    ("SI", EUROPE),        // Slovenia
    ("SJ", EUROPE),        // Svalbard and Jan Mayen
    ("SK", EUROPE),        // Slovakia
    ("SL", AFRICA),        // Sierra Leone
    ("SM", EUROPE),        // San Marino
    ("SN", AFRICA),        // Senegal
    ("SO", AFRICA),        // Somalia
    ("SR", SOUTH_AMERICA), // Suriname
    ("SS", AFRICA),        // South Sudan
    ("ST", AFRICA),        // Sao Tome and Principe
    ("SV", NORTH_AMERICA), // El Salvador
    ("SX", NORTH_AMERICA), // Sint Maarten
    ("SY", ASIA),          // Syria
    ("SZ", AFRICA),        // Eswatini
    ("TC", NORTH_AMERICA), // Turks and Caicos Islands
    ("TD", AFRICA),        // Chad
    ("TF", ANTARCTICA),    // French Southern Territories
    ("TG", AFRICA),        // Togo
    ("TH", ASIA),          // Thailand
    ("TJ", ASIA),          // Tajikistan
    ("TK", OCEANIA),       // Tokelau
    ("TL", OCEANIA),       // Timor Leste
    ("TM", ASIA),          // Turkmenistan
    ("TN", AFRICA),        // Tunisia
    ("TO", OCEANIA),       // Tonga
    ("TR", ASIA),          // Turkey
    ("TT", NORTH_AMERICA), // Trinidad and Tobago
    ("TV", OCEANIA),       // Tuvalu
    ("TW", ASIA),          // Taiwan
    ("TZ", AFRICA),        // Tanzania
    ("UA", EUROPE),        // Ukraine
    ("UG", AFRICA),        // Uganda
    ("UM", OCEANIA),       // United States Minor Outlying Islands
    ("US", NORTH_AMERICA), // United States
    ("UY", SOUTH_AMERICA), // Uruguay
    ("UZ", ASIA),          // Uzbekistan
    ("VA", EUROPE),        // Vatican
    ("VC", NORTH_AMERICA), // Saint Vincent and the Grenadines
    ("VE", SOUTH_AMERICA), // Venezuela
    ("VG", NORTH_AMERICA), // British Virgin Islands
    ("VI", NORTH_AMERICA), // U.S. Virgin Islands
    ("VN", ASIA),          // Vietnam
    ("VU", OCEANIA),       // Vanuatu
    ("WF", OCEANIA),       // Wallis and Futuna
    ("WS", OCEANIA),       // Samoa
    ("XK", EUROPE),        // Kosovo
    ("YE", ASIA),          // Yemen
    ("YT", AFRICA),        // Mayotte
    ("ZA", AFRICA),        // South Africa
    ("ZM", AFRICA),        // Zambia
    ("ZW", AFRICA),        // Zimbabwe
];

/// The continent code (`AF`, `AN`, `AS`, `EU`, `NA`, `OC`, `SA`) of the
/// country with ISO 3166-1 alpha-2 code `country` (uppercase), or `None` for
/// a code that is not a country.
pub(crate) fn continent_of(country: &str) -> Option<&'static str> {
    CONTINENTS
        .binary_search_by(|(code, _)| (*code).cmp(country))
        .ok()
        .and_then(|index| CONTINENTS.get(index))
        .map(|(_, continent)| *continent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spot_checks() {
        let cases = [
            ("US", "NA"),
            ("CA", "NA"),
            ("MX", "NA"),
            ("PA", "NA"),
            ("BR", "SA"),
            ("GB", "EU"),
            ("DE", "EU"),
            ("FR", "EU"),
            ("RU", "EU"),
            ("CY", "EU"),
            ("XK", "EU"),
            ("TR", "AS"),
            ("GE", "AS"),
            ("JP", "AS"),
            ("SG", "AS"),
            ("IL", "AS"),
            ("AU", "OC"),
            ("NZ", "OC"),
            ("EG", "AF"),
            ("ZA", "AF"),
            ("AQ", "AN"),
            ("TF", "AN"),
        ];
        for (country, continent) in cases {
            assert_eq!(continent_of(country), Some(continent), "{country}");
        }
    }

    #[test]
    fn not_countries() {
        for code in ["", "U", "USA", "us", "EU", "AP", "AN", "CS", "UK", "ZZ"] {
            assert_eq!(continent_of(code), None, "{code:?}");
        }
    }

    #[test]
    fn table_is_sorted_without_duplicates() {
        for pair in CONTINENTS.windows(2) {
            if let [(a, _), (b, _)] = pair {
                assert!(a < b, "{a} then {b}");
            }
        }
    }

    #[test]
    fn every_entry_is_well_formed() {
        let continents = [
            AFRICA,
            ANTARCTICA,
            ASIA,
            EUROPE,
            NORTH_AMERICA,
            OCEANIA,
            SOUTH_AMERICA,
        ];
        for (country, continent) in CONTINENTS {
            assert!(
                country.len() == 2 && country.bytes().all(|b| b.is_ascii_uppercase()),
                "{country:?}"
            );
            assert!(continents.contains(&continent), "{country}: {continent}");
            assert_eq!(continent_of(country), Some(continent));
        }
        for continent in continents {
            assert!(
                CONTINENTS.iter().any(|(_, c)| *c == continent),
                "{continent} has no country"
            );
        }
    }
}

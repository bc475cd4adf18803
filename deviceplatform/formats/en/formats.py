"""English formats with one change: a date and time shows seconds and its zone
("2026-12-03 08:40:56 UTC"). The admin renders them in UTC (TIME_ZONE); the script
deviceplatform/static/deviceplatform/dates.js shows them in the browser's zone with UTC on hover."""

DATETIME_FORMAT = "Y-m-d H:i:s T"
SHORT_DATETIME_FORMAT = "Y-m-d H:i:s T"

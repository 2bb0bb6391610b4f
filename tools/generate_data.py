#!/usr/bin/env python3
"""Generate Sparkify input data in the Udacity layout, at any scale.

    python tools/generate_data.py OUT_DIR --songs N --events N [--days N]
        [--start 2018-11-01] [--seed 42] [--users N] [--match-share F]
        [--cross-year] [--junk] [--force]
    python tools/generate_data.py OUT_DIR --tier 1      # 14,896 songs, ~8,000 events
    python tools/generate_data.py OUT_DIR --tier 2      # 100,000 songs, ~1,000,000 events

Writes
    OUT_DIR/song_data/X/Y/Z/TR<16 chars>.json   one song record per file
    OUT_DIR/log_data/YYYY/MM/YYYY-MM-DD-events.json   newline-delimited events

The files mimic the public udacity-dend sample byte for byte where it matters:
same key order, `json.dumps` spacing in song files and compact, `\\/`-escaped
JSON in log files, no trailing newline, `userId` as a string ("" when logged
out), `registration` as a float, `ts` in epoch milliseconds ending in 796, and
non-ASCII artist/song text in the log double-encoded (mojibake) as in the real
export, so plays of accented catalogue songs never match.
Only the standard library is used, and the output depends only on the
arguments (same seed, same bytes).
"""
import argparse
import bisect
import datetime as dt
import json
import math
import os
import random
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor

# --- Scale presets -----------------------------------------------------------

TIERS = {
    1: {"songs": 14_896, "events": 8_000, "days": 30},      # the full Udacity set
    2: {"songs": 100_000, "events": 1_000_000, "days": 30},
}
EVENTS_PER_USER = 80          # the sample has ~8,000 events from 97 users

# --- Song catalogue shares ---------------------------------------------------

EMPTY_LOCATION_SHARE = 0.40   # artist_location "" (sample: 28 of 71)
NULL_LOCATION_SHARE = 0.01    # artist_location null: the contract allows it
NULL_COORDS_IF_LOCATED = 0.33  # located artists without coordinates -> ~60% null overall
YEAR_ZERO_SHARE = 0.50        # year 0 means unknown
SINGLE_SONG_ARTIST_SHARE = 0.75  # the full set has ~1.5 songs per artist
MAX_SONGS_PER_ARTIST = 12
SHARED_TITLE_SHARE = 0.05     # generic titles ("Intro") reused by many artists
# Of an artist's 2nd and later songs (~40% of all songs):
ALT_VERSION_SHARE = 0.10      # same title+artist, different duration (another edit)
RERELEASE_SHARE = 0.015       # same title+artist+duration, another song_id (tie on match)
DUPLICATE_RECORD_SHARE = 0.002  # a second track file carrying an existing song_id
ARTIST_VARIANT_SHARE = 0.30   # later records of an artist differ (name, location)
ACCENT_SHARE = 0.03           # non-ASCII names/titles
QUOTE_SHARE = 0.01            # titles containing double quotes

# --- Event log shares ----------------------------------------------------------

NEXTSONG_SHARE = 0.82         # of logged-in page views (sample: 85% of all events)
CATALOGUE_PLAY_SHARE = 0.20   # NextSong plays of a generated song (default --match-share)
NEAR_MISS_SHARE = 0.05        # ...of which length is off by > 0.001 s: must not match
JITTER_SHARE = 0.03           # ...of which length is off by < 0.001 s: must still match
VISITOR_SESSION_SHARE = 0.03  # sessions of a visitor who never logs in
LOGIN_FIRST_SHARE = 0.05      # sessions that start with a logged-out Login
RELOGIN_SHARE = 0.6           # after Logout the visitor logs back in, else leaves
PAID_AT_START_SHARE = 0.35
UPGRADE_SHARE = 0.12          # free users who upgrade during the period
DOWNGRADE_SHARE = 0.05        # paid users who downgrade during the period
PAID_ACTIVITY_FACTOR = 5      # paid users play far more (sample: 82% of plays)
USER_ACTIVITY_SIGMA = 0.8     # log-normal spread: the busiest user has ~10% of events
DUPLICATE_EVENT_SHARE = 0.001  # event lines delivered twice (at least MIN_DUPLICATES)
MIN_DUPLICATES = 5
SONG_POPULARITY_SKEW = 2.5    # index = n * random() ** skew: a few hits, a long tail
TS_MS = 796                   # every ts in the real export ends in .796 s

# Sample activity by UTC hour and by weekday (Mon..Sun), from the real logs.
HOUR_WEIGHTS = [18, 20, 16, 13, 16, 21, 23, 22, 25, 31, 36, 39,
                37, 42, 50, 58, 63, 57, 58, 43, 40, 33, 25, 22]
WEEKDAY_WEIGHTS = [12, 13, 16, 12, 15, 7, 5]

# page -> (method, status), as in the real export
PAGE_META = {
    "NextSong": ("PUT", 200), "Home": ("GET", 200), "Login": ("PUT", 307),
    "Logout": ("PUT", 307), "Settings": ("GET", 200), "Save Settings": ("PUT", 307),
    "Help": ("GET", 200), "About": ("GET", 200), "Error": ("GET", 404),
    "Upgrade": ("GET", 200), "Downgrade": ("GET", 200),
    "Submit Upgrade": ("PUT", 307), "Submit Downgrade": ("PUT", 307),
}
# Logged-in pages other than NextSong; "level page" is Upgrade or Downgrade.
OTHER_PAGES = ["Home", "Logout", "Settings", "Help", "About", "Save Settings", "Error", "level page"]
OTHER_PAGE_CUM = [60, 69, 74, 78, 80, 81, 82, 89]
VISITOR_PAGES = ["Home", "Home", "Home", "About", "Help"]

# --- Word lists ----------------------------------------------------------------

ADJECTIVES = (
    "Red Blue Black White Golden Silver Broken Burning Crazy Dark Electric Empty "
    "Endless Falling Frozen Green Happy Hollow Holy Last Little Lonely Lost Lucky "
    "Mad Midnight Modern Naked Northern Old Pretty Quiet Radio Restless Rolling "
    "Sad Secret Silent Simple Sleepy Southern Strange Sweet Twisted Velvet Wild "
    "Young Bitter Brave Cosmic Distant Fading Gentle Heavy Hidden Iron Neon"
).split()
NOUNS = (
    "Angel Apple Bird Boy Bridge Candle Child City Cloud Dance Dream Fire Flower "
    "Friend Garden Ghost Girl Heart Highway Horse House Island Kiss Lady Light "
    "Love Machine Moon Morning Mountain Night Ocean Paradise Rain River Road Rose "
    "Sea Shadow Sky Smile Song Soul Star Stone Storm Street Summer Sun Train Tree "
    "Valley Wave Wind Window Winter World Year Echo Harbor Lantern Mirror Orchid "
    "Rocket Saint Thunder Tiger Voice Wolf Wonder"
).split()
VERBS = (
    "Running Dancing Waiting Falling Walking Dreaming Calling Crying Flying "
    "Holding Looking Living Burning Coming Going Singing Talking Fighting"
).split()
PREPOSITIONS = ["In The", "On The", "Through The", "Under The", "To The", "With The", "For The"]
FEMALE_NAMES = (
    "Amy Anna Ava Chloe Claire Ella Emily Emma Grace Hannah Kaylee Layla Lily Mia "
    "Olivia Sara Sophie Tegan Zoe Harper Jacqueline Stefany Cienna Lily Katherine"
).split()
MALE_NAMES = (
    "Aiden Alex Ben Carlos Daniel David Diego Eli Ethan Isaac Jack Jacob James "
    "Jayden Jordan Kevin Leo Liam Lucas Mason Noah Owen Rylan Samuel Theo Walter Will"
).split()
FIRST_NAMES = FEMALE_NAMES + MALE_NAMES
LAST_NAMES = (
    "Adams Allen Baker Brooks Brown Campbell Carter Clark Cox Cruz Davis Diaz "
    "Evans Flores Frye Garcia Gonzalez Gray Green Hall Harris Hill Jackson James "
    "Johnson Jones Kelly King Lee Lewis Lopez Martin Miller Moore Morgan Nelson "
    "Parker Perez Phillips Reed Rivera Roberts Robinson Rogers Sanchez Scott Smith "
    "Summers Taylor Thomas Turner Valdez Walker Ward White Williams Wilson Wright Young"
).split()
COMMON_TITLES = [
    "Intro", "Outro", "Home", "Angel", "Stay", "Forever", "Untitled", "Hold On",
    "Breathe", "Crazy", "Alive", "Run", "Silent Night", "Summertime", "Hallelujah",
]
TITLE_SUFFIXES = [
    " (Album Version)", " (Live)", " (Remix)", " (Remastered)", " (Explicit Album Version)",
    " (Radio Edit)", " (Acoustic)", " (LP Version)",
]
ACCENTS = {"e": "é", "a": "á", "o": "ö", "u": "ü", "i": "í", "n": "ñ"}
# (artist_location, latitude, longitude); the same string always carries the same point.
ARTIST_PLACES = [
    ("New York, NY", 40.71455, -74.00712), ("Los Angeles, CA", 34.05349, -118.24532),
    ("Chicago, IL", 41.88415, -87.63241), ("Nashville, TN.", 36.16778, -86.77836),
    ("California - SF", 37.77916, -122.42005), ("California - LA", 34.05349, -118.24532),
    ("London, England", 51.50632, -0.12714), ("Denmark", 56.27609, 9.51695),
    ("Zagreb Croatia", 45.80726, 15.9676), ("Orlando, FL", 28.53823, -81.37739),
    ("Utah", 39.49974, -111.54732), ("Pennsylvania", 40.99471, -77.60454),
    ("Fort Worth, TX", 32.74863, -97.32925), ("Panama", 8.4177, -80.11278),
    ("Seattle, Washington USA", 47.60356, -122.32944), ("Hamilton, Ohio", 39.39778, -84.56164),
    ("Beverly Hills, CA", 34.07305, -118.39951), ("Mineola, AR", 34.31109, -94.02978),
    ("United States", 37.16793, -95.84502), ("Detroit, MI", 42.33168, -83.04792),
    ("Atlanta, GA", 33.74831, -84.39111), ("Paris, France", 48.85693, 2.3412),
    ("Berlin, Germany", 52.51607, 13.37698), ("Stockholm, Sweden", 59.33217, 18.06243),
    ("Montreal, Quebec, Canada", 45.51228, -73.55439), ("Kingston, Jamaica", 17.99702, -76.79358),
    ("Toronto, Ontario, Canada", 43.64856, -79.38533), ("Sao Paulo, Brazil", -23.56288, -46.65452),
    ("Houston, TX", 29.76045, -95.36978), ("Glasgow, Scotland", 55.85711, -4.24328),
    ("New York, NY [Manhattan]", 40.79086, -73.96644), ("Noci (BA)", -13.442, -41.9952),
]
USER_LOCATIONS = [
    "San Francisco-Oakland-Hayward, CA", "Phoenix-Mesa-Scottsdale, AZ", "Saginaw, MI",
    "Atlanta-Sandy Springs-Roswell, GA", "Chicago-Naperville-Elgin, IL-IN-WI", "Columbia, SC",
    "Dallas-Fort Worth-Arlington, TX", "Detroit-Warren-Dearborn, MI", "Eugene, OR",
    "Houston-The Woodlands-Sugar Land, TX", "Lansing-East Lansing, MI", "Las Cruces, NM",
    "New York-Newark-Jersey City, NY-NJ-PA", "Portland-South Portland, ME",
    "Los Angeles-Long Beach-Anaheim, CA", "Seattle-Tacoma-Bellevue, WA", "Tampa-St. Petersburg-Clearwater, FL",
    "Washington-Arlington-Alexandria, DC-VA-MD-WV", "Birmingham-Hoover, AL", "Klamath Falls, OR",
    "Janesville-Beloit, WI", "La Crosse-Onalaska, WI-MN", "Augusta-Richmond County, GA-SC",
    "Lake Havasu City-Kingman, AZ", "Red Bluff, CA", "Winston-Salem, NC",
]
USER_AGENTS = [  # some are wrapped in literal quotes in the real export
    '"Mozilla/5.0 (Macintosh; Intel Mac OS X 10_9_4) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/36.0.1985.143 Safari/537.36"',  # noqa: E501
    '"Mozilla/5.0 (Windows NT 6.1; WOW64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/35.0.1916.153 Safari/537.36"',
    '"Mozilla/5.0 (Windows NT 6.1; WOW64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/36.0.1985.143 Safari/537.36"',
    '"Mozilla/5.0 (Macintosh; Intel Mac OS X 10_9_4) AppleWebKit/537.78.2 (KHTML, like Gecko) Version/7.0.6 Safari/537.78.2"',  # noqa: E501
    '"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Ubuntu Chromium/36.0.1985.125 Chrome/36.0.1985.125 Safari/537.36"',  # noqa: E501
    '"Mozilla/5.0 (iPhone; CPU iPhone OS 7_1_2 like Mac OS X) AppleWebKit/537.51.2 (KHTML, like Gecko) Version/7.0 Mobile/11D257 Safari/9537.53"',  # noqa: E501
    '"Mozilla/5.0 (Windows NT 6.3; WOW64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/36.0.1985.125 Safari/537.36"',
    "Mozilla/5.0 (Windows NT 6.1; WOW64; rv:31.0) Gecko/20100101 Firefox/31.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10.9; rv:31.0) Gecko/20100101 Firefox/31.0",
    "Mozilla/5.0 (Windows NT 6.1; WOW64; Trident/7.0; rv:11.0) like Gecko",
    "Mozilla/5.0 (compatible; MSIE 10.0; Windows NT 6.2; WOW64; Trident/6.0)",
    "Mozilla/5.0 (X11; Linux x86_64; rv:31.0) Gecko/20100101 Firefox/31.0",
]
ID_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ID_ALNUM = ID_LETTERS + "0123456789"
FILES_PER_LEAF_DIR = 11       # the full set: ~14,900 files over A-B/A-Z/A-Z
WRITER_THREADS = 8


# --- Small helpers -------------------------------------------------------------

def log_json(value):
    """JSON text of a log field as the real export writes it: ASCII, '/' escaped."""
    return json.dumps(value).replace("/", "\\/")


def mojibake(text):
    """The real export double-encodes non-ASCII text ("é" -> "Ã\\x83Â©")."""
    for _ in range(2):
        text = text.encode("utf-8").decode("latin-1")
    return text


def skewed_index(rng, n):
    """An index in [0, n) where low indexes are far more likely (popular items)."""
    return int(n * rng.random() ** SONG_POPULARITY_SKEW)


def maybe_accent(rng, text):
    if rng.random() >= ACCENT_SHARE:
        return text
    for plain, accented in ACCENTS.items():
        if plain in text:
            return text.replace(plain, accented, 1)
    return text


def make_id(rng, prefix, head, seen):
    """An 18-char id like SOGVQGJ12AB017F169, unique within `seen`."""
    width = 16 - len(head)
    while True:
        new_id = f"{prefix}{head}{rng.getrandbits(4 * width):0{width}X}"
        if new_id not in seen:
            seen.add(new_id)
            return new_id


def person_name(rng):
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def artist_name(rng):
    pick = rng.random()
    if pick < 0.25:
        name = person_name(rng)
    elif pick < 0.45:
        name = f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}s"
    elif pick < 0.60:
        name = f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    elif pick < 0.72:
        name = f"{person_name(rng)} & The {rng.choice(NOUNS)}s"
    elif pick < 0.80:
        name = f"{rng.choice(['DJ', 'MC', 'Lil'])} {rng.choice(NOUNS)}"
    elif pick < 0.90:
        name = f"{rng.choice(NOUNS)} {rng.choice(NOUNS)}"
    else:  # collaborations, written with ';' or '/' as in the real data
        name = f"{person_name(rng)}{rng.choice([';', '/', ' & '])}{person_name(rng)}"
    return maybe_accent(rng, name)


def song_title(rng):
    if rng.random() < SHARED_TITLE_SHARE:
        return rng.choice(COMMON_TITLES)
    pick = rng.random()
    if pick < 0.35:
        title = f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    elif pick < 0.55:
        title = f"{rng.choice(VERBS)} {rng.choice(PREPOSITIONS)} {rng.choice(NOUNS)}"
    elif pick < 0.70:
        title = f"{rng.choice(NOUNS)} Of {rng.choice(NOUNS)}"
    elif pick < 0.85:
        title = (f"{rng.choice(['I', 'You', 'We', 'She'])} {rng.choice(['Know', 'Need', 'Want', 'Miss', 'Saw'])} "
                 f"{rng.choice(['Your', 'The', 'My'])} {rng.choice(NOUNS)}")
    else:
        title = f"{rng.choice(NOUNS)}'s {rng.choice(NOUNS)}"
    if rng.random() < QUOTE_SHARE:
        title = f'{title} (From "{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}")'
    if rng.random() < 0.15:
        title += rng.choice(TITLE_SUFFIXES)
    return maybe_accent(rng, title)


def song_duration(rng):
    """Seconds with 5 decimals, log-normal around 4 minutes."""
    return round(min(1800.0, max(20.0, rng.lognormvariate(math.log(235), 0.35))), 5)


def song_year(rng):
    if rng.random() < YEAR_ZERO_SHARE:
        return 0
    return min(2010, int(2010 - rng.expovariate(1 / 12)))


# --- Song catalogue --------------------------------------------------------------

def make_artist(rng, seen_ids):
    """The artist's canonical fields: id, name, location, latitude, longitude."""
    artist_id = make_id(rng, "AR", "".join(rng.choices(ID_ALNUM, k=5)) + "11", seen_ids)
    pick = rng.random()
    if pick < NULL_LOCATION_SHARE:
        place = (None, None, None)
    elif pick < EMPTY_LOCATION_SHARE:
        place = ("", None, None)
    else:
        place = rng.choice(ARTIST_PLACES)
        if rng.random() < NULL_COORDS_IF_LOCATED:
            place = (place[0], None, None)
    return (artist_id, artist_name(rng)) + place


def artist_variant(rng, artist):
    """How a later record of the same artist may differ (as in the real data)."""
    artist_id, name, location, lat, lon = artist
    pick = rng.random()
    if pick < 0.4:
        name = f"{name} {rng.choice(['featuring', 'feat.', 'Featuring'])} {person_name(rng)}"
    elif pick < 0.7:
        location, lat, lon = "", None, None
    else:
        lat, lon = None, None
    return (artist_id, name, location, lat, lon)


def songs_for_artist(rng):
    if rng.random() < SINGLE_SONG_ARTIST_SHARE:
        return 1
    return min(MAX_SONGS_PER_ARTIST, 2 + int(rng.expovariate(1 / 2.0)))


def song_record(rng, artist, title, duration, seen_ids):
    artist_id, name, location, lat, lon = artist
    head = "".join(rng.choices(ID_LETTERS, k=5)) + "12A"
    return {
        "num_songs": 1, "artist_id": artist_id, "artist_latitude": lat,
        "artist_longitude": lon, "artist_location": location, "artist_name": name,
        "song_id": make_id(rng, "SO", head, seen_ids), "title": title,
        "duration": duration, "year": song_year(rng),
    }


def artist_records(rng, artist, count, seen_ids):
    """All song records of one artist, with versions and variants mixed in."""
    records = []
    for k in range(count):
        variant = artist if k == 0 or rng.random() >= ARTIST_VARIANT_SHARE else artist_variant(rng, artist)
        title, duration = song_title(rng), song_duration(rng)
        if records:
            pick, earlier = rng.random(), rng.choice(records)
            if pick < RERELEASE_SHARE:
                title, duration = earlier["title"], earlier["duration"]
            elif pick < RERELEASE_SHARE + ALT_VERSION_SHARE:
                title = earlier["title"]
                duration = round(earlier["duration"] + rng.choice([-1, 1]) * rng.uniform(1, 40), 5)
        records.append(song_record(rng, variant, title, duration, seen_ids))
    return records


def build_catalogue(rng, n_files):
    """One record per song file; a few files repeat an earlier record's song_id."""
    records, seen_ids = [], set()
    while len(records) < n_files:
        if records and rng.random() < DUPLICATE_RECORD_SHARE:
            records.append(dict(rng.choice(records)))
            continue
        artist = make_artist(rng, seen_ids)
        records.extend(artist_records(rng, artist, songs_for_artist(rng), seen_ids))
    return records[:n_files]


def track_ids(rng, n_files):
    """Track ids; chars 3-5 pick the folder, spread like the real set (~11 per folder)."""
    n_top = max(1, min(26, round(n_files / (26 * 26 * FILES_PER_LEAF_DIR))))
    top_letters, seen, ids = ID_LETTERS[:n_top], set(), []
    for _ in range(n_files):
        head = rng.choice(top_letters) + "".join(rng.choices(ID_LETTERS, k=4)) + "12"
        ids.append(make_id(rng, "TR", head, seen))
    return ids


def write_songs(out_dir, records, ids):
    """One file per record. Creating 100k tiny files is all system calls, which
    release the GIL, so a few threads writing different folders overlap them."""
    folders = {}
    for record, track_id in zip(records, ids):
        folder = os.path.join(out_dir, "song_data", track_id[2], track_id[3], track_id[4])
        folders.setdefault(folder, []).append((track_id, json.dumps(record).encode("ascii")))
    with ThreadPoolExecutor(WRITER_THREADS) as pool:
        for _ in pool.map(write_folder, folders.items()):
            pass


def write_folder(item):
    folder, files = item
    os.makedirs(folder, exist_ok=True)  # each folder is created once
    for track_id, data in files:
        write_bytes(os.path.join(folder, track_id + ".json"), data)


def write_bytes(path, data):
    """Unbuffered os-level write: no file-object overhead for tiny files."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


# --- Users and songs as they appear in the log -------------------------------------

class User:
    """A known user, with the JSON text of its fixed fields rendered once."""

    def __init__(self, rng, user_id, period_start, level, change_at):
        gender = rng.choice("FFM")  # the sample has twice as many women
        first = rng.choice(FEMALE_NAMES if gender == "F" else MALE_NAMES)
        registered = period_start - rng.randrange(86400, 90 * 86400)
        self.names = f'"firstName":{log_json(first)},"gender":"{gender}",'
        self.last = f'"lastName":{log_json(rng.choice(LAST_NAMES))},'
        self.location = f'"location":{log_json(rng.choice(USER_LOCATIONS))},'
        self.registration = f'"registration":{float(registered * 1000 + TS_MS)!r},'
        self.tail = f'"userAgent":{log_json(rng.choice(USER_AGENTS))},"userId":"{user_id}"}}'
        self.level, self.change_at = level, change_at
        factor = PAID_ACTIVITY_FACTOR if self.level == "paid" or self.change_at else 1
        self.weight = rng.lognormvariate(0, USER_ACTIVITY_SIGMA) * factor

    def level_at(self, sec):
        if self.change_at is None or sec < self.change_at:
            return self.level
        return "free" if self.level == "paid" else "paid"


class Playlist:
    """Picks the song of each NextSong: a catalogue song or an unknown one."""

    def __init__(self, rng, records, n_unknown, catalogue_share):
        self.rng, self.catalogue_share = rng, catalogue_share
        self.records = list(records)
        rng.shuffle(self.records)  # popularity rank independent of file order
        self.cache = {}
        self.unknown = [self._render(artist_name(rng), song_title(rng), song_duration(rng))
                        for _ in range(n_unknown)]
        self.matched = self.near_misses = 0

    @staticmethod
    def _render(artist, title, length):
        """(artist JSON, song JSON, length JSON, length seconds) as in the log."""
        return (log_json(mojibake(artist)), log_json(mojibake(title)), repr(length), length)

    def pick(self):
        rng = self.rng
        if rng.random() >= self.catalogue_share:
            return self.unknown[skewed_index(rng, len(self.unknown))]
        index = skewed_index(rng, len(self.records))
        song = self.cache.get(index)
        if song is None:
            rec = self.records[index]
            song = self.cache[index] = self._render(rec["artist_name"], rec["title"], rec["duration"])
        pick = rng.random()
        if pick < NEAR_MISS_SHARE:  # another edit of the track: must stay unmatched
            self.near_misses += 1
            length = round(song[3] + rng.choice([-1, 1]) * rng.uniform(0.002, 3.0), 5)
            return song[:2] + (repr(length), length)
        if pick < NEAR_MISS_SHARE + JITTER_SHARE:  # rounding noise: must still match
            length = round(song[3] + rng.uniform(-0.0005, 0.0005), 5)
            song = song[:2] + (repr(length), length)
        self.matched += 1
        return song


# --- Event lines -------------------------------------------------------------------

def user_line(u, item, level, page, ts, sid, song=None):
    artist, title, length = ("null", "null", "null") if song is None else song[:3]
    method, status = PAGE_META[page]
    return (f'{{"artist":{artist},"auth":"Logged In",{u.names}"itemInSession":{item},{u.last}'
            f'"length":{length},"level":"{level}",{u.location}"method":"{method}","page":"{page}",'
            f'{u.registration}"sessionId":{sid},"song":{title},"status":{status},"ts":{ts},{u.tail}')


def visitor_line(item, level, page, ts, sid):
    method, status = PAGE_META[page]
    return (f'{{"artist":null,"auth":"Logged Out","firstName":null,"gender":null,"itemInSession":{item},'
            f'"lastName":null,"length":null,"level":"{level}","location":null,"method":"{method}",'
            f'"page":"{page}","registration":null,"sessionId":{sid},"song":null,"status":{status},'
            f'"ts":{ts},"userAgent":null,"userId":""}}')


def session_length(rng):
    """Logged-in page views: half the sessions are 1-3 views, a few exceed 100."""
    if rng.random() < 0.5:
        return 1 + int(rng.expovariate(1 / 1.2))
    return min(250, 1 + int(rng.expovariate(1 / 14)))


def pick_page(rng, level):
    if rng.random() < NEXTSONG_SHARE:
        return "NextSong"
    page = OTHER_PAGES[bisect.bisect(OTHER_PAGE_CUM, rng.random() * OTHER_PAGE_CUM[-1])]
    if page == "level page":
        return "Upgrade" if level == "free" else "Downgrade"
    return page


class Session:
    """One session's events as (second, line); itemInSession counts every event."""

    def __init__(self, user, sid, sec, level):
        self.user, self.sid, self.sec, self.level = user, sid, sec, level
        self.item, self.events = 0, []

    def log(self, page, song=None, logged_in=True):
        ts = self.sec * 1000 + TS_MS
        if logged_in:
            line = user_line(self.user, self.item, self.level, page, ts, self.sid, song)
        else:
            line = visitor_line(self.item, self.level, page, ts, self.sid)
        self.events.append((self.sec, line))
        self.item += 1

    def wait(self, seconds):
        self.sec += seconds


def user_session(rng, user, sid, sec, playlist, min_views=1):
    s = Session(user, sid, sec, user.level_at(sec))
    if rng.random() < LOGIN_FIRST_SHARE:
        s.log("Login", logged_in=False)
        s.wait(rng.randint(5, 60))
    for _ in range(max(min_views, session_length(rng))):
        if user.level_at(s.sec) != s.level:  # the level flips during this session
            flip_level(rng, s)
        page = pick_page(rng, s.level)
        if page == "NextSong":
            song = playlist.pick()
            s.log(page, song)
            s.wait(int(song[3]))  # the next page comes when the song ends
            continue
        s.log(page)
        s.wait(rng.choice([0, 1, 1, 5, 20, 60, 120]))  # page views come in bursts
        if page == "Logout":  # the visitor sees Home, then logs back in or leaves
            s.wait(rng.randint(1, 60))
            s.log("Home", logged_in=False)
            if rng.random() >= RELOGIN_SHARE:
                break
            s.wait(rng.randint(1, 30))
            s.log("Login", logged_in=False)
            s.wait(rng.randint(1, 30))
    return s.events


def flip_level(rng, s):
    """As in the sample: Upgrade page, Submit Upgrade at the old level, Home at the new."""
    page = "Upgrade" if s.level == "free" else "Downgrade"
    s.log(page)
    s.wait(rng.randint(5, 60))
    s.log("Submit " + page)
    s.wait(rng.randint(1, 20))
    s.level = "paid" if s.level == "free" else "free"
    s.log("Home")
    s.wait(rng.randint(1, 60))


def visitor_session(rng, sid, sec):
    """A visitor who never logs in: one to three pages."""
    s = Session(None, sid, sec, rng.choice(["free", "free", "paid"]))
    for _ in range(rng.randint(1, 3)):
        s.log(rng.choice(VISITOR_PAGES), logged_in=False)
        s.wait(rng.randint(1, 120))
    return s.events


def day_weights(start, days):
    """Weekdays busier than weekends, and a slow growth over the period."""
    return [WEEKDAY_WEIGHTS[(start + dt.timedelta(d)).weekday()] * (1 + d / (2 * days)) for d in range(days)]


def session_start(rng, period_start, day_cum, hour_cum):
    day = bisect.bisect(day_cum, rng.random() * day_cum[-1])
    hour = bisect.bisect(hour_cum, rng.random() * hour_cum[-1])
    return period_start + day * 86400 + hour * 3600 + rng.randrange(3600)


def plan_levels(rng, n_users, period_start, period_secs):
    """(starting level, second of the flip or None) per user, in exact shares
    so that even 100 users include several upgrades and a downgrade."""
    n_paid = round(n_users * PAID_AT_START_SHARE)
    n_free = n_users - n_paid
    plans = [("paid", i < round(n_paid * DOWNGRADE_SHARE)) for i in range(n_paid)]
    plans += [("free", i < round(n_free * UPGRADE_SHARE)) for i in range(n_free)]
    rng.shuffle(plans)
    return [(level, period_start + rng.randrange(period_secs // 10, period_secs * 9 // 10) if flips else None)
            for level, flips in plans]


def build_events(rng, n_events, start, days, n_users, playlist):
    """All events as (second, line), in generation order."""
    period_start = int(dt.datetime(start.year, start.month, start.day, tzinfo=dt.timezone.utc).timestamp())
    users, user_id = [], 1
    for level, change_at in plan_levels(rng, n_users, period_start, days * 86400):
        user_id += 1 + (rng.random() < 0.05)  # ids with a few gaps, as in the sample
        users.append(User(rng, str(user_id), period_start, level, change_at))
    user_cum = list(accumulate(u.weight for u in users))
    day_cum = list(accumulate(day_weights(start, days)))
    hour_cum = list(accumulate(HOUR_WEIGHTS))
    events, sid = [], 0
    for user in users:  # each level change gets a session in which the user submits it
        if user.change_at is not None:
            sid += 1
            events.extend(user_session(rng, user, sid, user.change_at - rng.randint(1, 60), playlist, min_views=3))
    while len(events) < n_events:
        sid += rng.randint(1, 2)
        sec = session_start(rng, period_start, day_cum, hour_cum)
        if rng.random() < VISITOR_SESSION_SHARE:
            events.extend(visitor_session(rng, sid, sec))
        else:
            user = users[bisect.bisect(user_cum, rng.random() * user_cum[-1])]
            events.extend(user_session(rng, user, sid, sec, playlist))
    return events, period_start


def accumulate(values):
    total = 0.0
    for value in values:
        total += value
        yield total


def by_day(events, period_start, days):
    """Per-day lists of lines sorted by ts; events past the period are cut off."""
    buckets = [[] for _ in range(days)]
    for sec, line in events:
        day = (sec - period_start) // 86400
        if 0 <= day < days:
            buckets[day].append((sec, line))
    for bucket in buckets:
        bucket.sort(key=lambda event: event[0])  # stable: a session keeps its order
    return [[line for _, line in bucket] for bucket in buckets]


def add_duplicates(rng, day_lines, n_events):
    """Re-deliver a few events: the exact same line again, later in the same file."""
    count, busy_days = max(MIN_DUPLICATES, int(n_events * DUPLICATE_EVENT_SHARE)), [d for d in day_lines if d]
    for _ in range(count):
        lines = rng.choice(busy_days)
        pos = rng.randrange(len(lines))
        lines.insert(rng.randint(pos + 1, len(lines)), lines[pos])
    return count


def write_logs(out_dir, start, day_lines):
    for offset, lines in enumerate(day_lines):
        if not lines:
            continue
        day = start + dt.timedelta(offset)
        folder = os.path.join(out_dir, "log_data", f"{day:%Y}", f"{day:%m}")
        os.makedirs(folder, exist_ok=True)
        # The real files have no trailing newline.
        write_bytes(os.path.join(folder, f"{day:%Y-%m-%d}-events.json"), "\n".join(lines).encode("ascii"))


# --- Junk (opt-in): what real downloads and bad feeds carry ---------------------------

DS_STORE = b"\x00\x00\x00\x01Bud1" + bytes(2048)
APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(4000)


def junk_song_files(out_dir, records, ids):
    """Hidden files (skipped) and bad song files (rejected) in the song tree."""
    songs = os.path.join(out_dir, "song_data")
    first_dir = os.path.join(songs, ids[0][2], ids[0][3], ids[0][4])
    mac_dir = os.path.join(songs, "__MACOSX", ids[1][2], ids[1][3], ids[1][4])
    os.makedirs(mac_dir, exist_ok=True)
    write_bytes(os.path.join(songs, ".DS_Store"), DS_STORE)
    write_bytes(os.path.join(first_dir, ".DS_Store"), DS_STORE)
    write_bytes(os.path.join(first_dir, "._" + ids[0] + ".json"), APPLE_DOUBLE)
    write_bytes(os.path.join(mac_dir, "._" + ids[1] + ".json"), APPLE_DOUBLE)
    no_id = {k: v for k, v in records[0].items() if k != "song_id"}
    write_bytes(os.path.join(first_dir, "TRZZZZZ12ZZZZZZZZZ.json"), json.dumps(no_id).encode("ascii"))
    write_bytes(os.path.join(first_dir, "TRZZZZY12ZZZZZZZZZ.json"), json.dumps(records[1]).encode("ascii")[:40])
    return 4, 2


def junk_event_lines(out_dir, day_lines):
    """A hidden file in the log tree, and three bad lines in the first day file."""
    os.makedirs(os.path.join(out_dir, "log_data"), exist_ok=True)
    write_bytes(os.path.join(out_dir, "log_data", ".DS_Store"), DS_STORE)
    lines = next(lines for lines in day_lines if lines)
    good = lines[0]
    lines[1:1] = [
        good[: len(good) // 2],                      # not valid JSON
        good.replace('"ts":', '"ts_lost":', 1),      # ts missing
        good.replace('"ts":', '"ts":"x', 1).replace(',"userAgent"', '","userAgent"', 1),  # ts not an integer
    ]
    return 1, 3


# --- Command line --------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--tier", type=int, choices=sorted(TIERS), help="preset sizes; explicit flags win")
    parser.add_argument("--songs", type=int, help="number of song files")
    parser.add_argument("--events", type=int, help="approximate number of events")
    parser.add_argument("--days", type=int, help="days of logs (default 30)")
    parser.add_argument("--start", type=dt.date.fromisoformat, default=dt.date(2018, 11, 1),
                        help="first day of logs, YYYY-MM-DD (default 2018-11-01)")
    parser.add_argument("--cross-year", action="store_true",
                        help="move the start to late December of --start's year (Dec 20 for 30 days) "
                             "so the logs span New Year")
    parser.add_argument("--users", type=int, help=f"known users (default events / {EVENTS_PER_USER}, at least 100)")
    parser.add_argument("--match-share", type=float, default=CATALOGUE_PLAY_SHARE,
                        help="share of NextSong plays that pick a catalogue song")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--junk", action="store_true", help="add hidden files and bad records")
    parser.add_argument("--force", action="store_true", help="replace existing song_data/ and log_data/")
    args = parser.parse_args(argv)
    preset = TIERS.get(args.tier, {"days": 30})
    for name in ("songs", "events", "days"):
        if getattr(args, name) is None:
            setattr(args, name, preset.get(name))
    if args.songs is None or args.events is None:
        parser.error("give --tier, or --songs and --events")
    if args.songs < 2 or args.events < 1 or args.days < 1:
        parser.error("--songs must be >= 2, --events and --days >= 1")
    if args.cross_year:
        # Up to 12 days of December, the rest in January (Dec 20 for 30 days).
        args.start = dt.date(args.start.year + 1, 1, 1) - dt.timedelta(min(12, max(1, args.days // 2)))
    if args.users is None:
        args.users = max(100, round(args.events / EVENTS_PER_USER))
    return args


def prepare_out_dir(out_dir, force):
    for tree in ("song_data", "log_data"):
        path = os.path.join(out_dir, tree)
        if os.path.exists(path):
            if not force:
                sys.exit(f"{path} exists; use --force to replace it")
            shutil.rmtree(path)
    os.makedirs(out_dir, exist_ok=True)


def main(argv=None):
    args = parse_args(argv)
    began = time.perf_counter()
    prepare_out_dir(args.out_dir, args.force)
    rng = random.Random(args.seed)
    records = build_catalogue(rng, args.songs)
    ids = track_ids(rng, args.songs)
    write_songs(args.out_dir, records, ids)
    songs_done = time.perf_counter()
    n_unknown = min(200_000, max(1_000, args.events // 2))
    playlist = Playlist(rng, records, n_unknown, args.match_share)
    events, period_start = build_events(rng, args.events, args.start, args.days, args.users, playlist)
    day_lines = by_day(events, period_start, args.days)
    n_lines = sum(map(len, day_lines))
    n_dups = add_duplicates(rng, day_lines, n_lines)
    junk = ""
    if args.junk:
        hidden_songs, bad_songs = junk_song_files(args.out_dir, records, ids)
        hidden_logs, bad_lines = junk_event_lines(args.out_dir, day_lines)
        junk = f", junk: {hidden_songs + hidden_logs} hidden files, {bad_songs} bad song files, {bad_lines} bad lines"
    write_logs(args.out_dir, args.start, day_lines)
    end = args.start + dt.timedelta(args.days - 1)
    print(f"{args.songs:,} song files ({len({r['song_id'] for r in records}):,} songs), "
          f"{n_lines + n_dups:,} events ({n_dups} duplicated, ~{playlist.matched:,} catalogue plays, "
          f"~{playlist.near_misses:,} near misses) from {args.users:,} users, "
          f"{sum(1 for d in day_lines if d)} day files {args.start}..{end}"
          f"{junk} in {time.perf_counter() - began:.1f} s (songs {songs_done - began:.1f} s) -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

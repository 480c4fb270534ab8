#include "workloads.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <iterator>
#include <sstream>

namespace hotpool::test {
namespace {

namespace fs = std::filesystem;

// A fixed-seed generator: the inputs must be the same bytes on every run.
class InputGenerator {
 public:
  explicit InputGenerator(uint64_t seed) : state_(seed) {}
  uint64_t next(uint64_t bound) {
    state_ = state_ * 6364136223846793005ULL + 1442695040888963407ULL;
    return (state_ >> 33) % bound;
  }
  const char* word() {
    static const char* const kWords[] = {
        "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
        "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo",
        "sierra", "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu"};
    return kWords[next(std::size(kWords))];
  }

 private:
  uint64_t state_;
};

void write_file(const fs::path& path, const std::string& content) {
  fs::create_directories(path.parent_path());
  std::ofstream out(path, std::ios::binary);
  out << content;
  ASSERT_TRUE(out.good()) << "cannot write " << path;
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::vector<std::string> split_lines(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

// ~4.5 MB of "word word number word" lines, in no particular order.
std::string sort_input() {
  InputGenerator gen(1);
  std::string text;
  for (int i = 0; i < 150000; ++i) {
    text += gen.word();
    text += ' ';
    text += gen.word();
    text += ' ' + std::to_string(gen.next(1000000)) + ' ';
    text += gen.word();
    text += '\n';
  }
  return text;
}

// ~3 MB of text that compresses, but not to nothing.
std::string gzip_input() {
  InputGenerator gen(2);
  std::string text;
  while (text.size() < 3u << 20) {
    const int words = 4 + static_cast<int>(gen.next(12));
    for (int w = 0; w < words; ++w) {
      text += gen.word();
      text += w + 1 < words ? ' ' : '\n';
    }
    if (gen.next(4) == 0) text += std::to_string(gen.next(1u << 30)) + '\n';
  }
  return text;
}

const char kPythonScript[] = R"PY(import collections, json, re, sys

class Generator:
    def __init__(self, seed):
        self.state = seed
    def next(self, bound):
        self.state = (self.state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        return (self.state >> 33) % bound

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
         "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()
gen = Generator(42)
records = []
for i in range(25000):
    words = [WORDS[gen.next(len(WORDS))] for _ in range(2 + gen.next(5))]
    records.append({"id": i, "name": "-".join(words) + "-" + str(gen.next(1000)),
                    "tags": sorted(set(words)), "score": gen.next(100000) / 100.0,
                    "nested": {"depth": gen.next(5), "items": list(range(gen.next(8)))}})
text = json.dumps(records, sort_keys=True)
decoded = json.loads(text)
assert decoded == records
tag_counts = collections.Counter(tag for r in decoded for tag in r["tags"])
pattern = re.compile(r"([a-z]+)-([a-z]+)-(\d+)$")
pairs = collections.defaultdict(list)
for r in decoded:
    m = pattern.search(r["name"])
    if m:
        pairs[(m.group(1), m.group(2))].append(int(m.group(3)))
by_score = sorted(decoded, key=lambda r: (-r["score"], r["id"]))
index = {r["name"]: r["id"] for r in decoded}
shouted = [re.sub(r"([aeiou])", lambda m: m.group(1).upper(), n) for n in sorted(index)]
print("records", len(records), "json bytes", len(text))
for tag, count in sorted(tag_counts.items()):
    print(f"tag {tag:10} {count:6}")
for key in sorted(pairs)[:40]:
    values = pairs[key]
    print("pair", *key, len(values), sum(values), max(values))
print("top", [(r["id"], r["score"]) for r in by_score[:10]])
print("distinct names", len(index), "vowels", sum(s.count("A") for s in shouted))
print("\n".join(shouted[:20]))
print(json.dumps(by_score[:3], indent=2, sort_keys=True))
sys.exit(3)
)PY";

const char kPerlScript[] = R"PL(use strict;
use warnings;

my @words = qw(alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike
               november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu);
my $state = 42;
sub rnd {
    use integer;
    my ($bound) = @_;
    $state = ($state * 1103515245 + 12345) % 2147483648;
    return ($state / 65536) % $bound;
}

my (%count, %first, %lengths, @lines);
for my $i (0 .. 49999) {
    my $line = join ' ', map { $words[rnd(scalar @words)] } 1 .. (3 + rnd(8));
    push @lines, $line . ' #' . rnd(100000);
}
for my $line (@lines) {
    $count{$_}++ for split / /, $line;
    $first{"$1 $2"} += $3 if $line =~ /^(\w+) (\w+).*#(\d+)$/;
    push @{ $lengths{length $line} }, $line;
}
my @by_count = sort { $count{$b} <=> $count{$a} || $a cmp $b } keys %count;
print "$_ $count{$_}\n" for @by_count[0 .. 9];
my @pairs = sort keys %first;
printf "%s %d\n", $_, $first{$_} for @pairs[0 .. 29];
(my $copy = join "\n", @lines) =~ s/\b(\w+?)a\b/\U$1\E-A/g;
print length($copy), " ", scalar(() = $copy =~ /-A\b/g), "\n";
for my $len (sort { $a <=> $b } keys %lengths) {
    my @same = sort @{ $lengths{$len} };
    printf "%3d %5d %s\n", $len, scalar @same, $same[0];
}
my %inverted;
push @{ $inverted{ $count{$_} % 7 } }, $_ for keys %count;
print join(',', $_, sort @{ $inverted{$_} }), "\n" for sort { $a <=> $b } keys %inverted;
)PL";

const char kSqliteScript[] = R"SQL(CREATE TABLE items(id INTEGER PRIMARY KEY, grp INTEGER, name TEXT, value REAL);
WITH RECURSIVE counter(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM counter WHERE x < 20000)
INSERT INTO items SELECT x, x % 37, 'name-' || (x * 7919 % 10007), (x * 2654435761 % 100000) / 100.0
FROM counter;
CREATE INDEX items_by_name ON items(name);
SELECT count(*), sum(value), min(name), max(name) FROM items;
SELECT grp, count(*), round(sum(value), 2), round(avg(value), 4), min(id), max(id)
FROM items GROUP BY grp ORDER BY grp;
SELECT count(DISTINCT name), count(DISTINCT grp) FROM items;
SELECT id, name, value FROM items WHERE name LIKE 'name-12%' ORDER BY value DESC, id LIMIT 25;
SELECT substr(name, 1, 7) AS prefix, count(*), group_concat(id, ' ') FROM
  (SELECT * FROM items WHERE id % 500 = 0 ORDER BY id) GROUP BY prefix ORDER BY prefix;
SELECT a.grp, count(*) FROM items a JOIN items b ON a.name = b.name AND a.id < b.id
GROUP BY a.grp ORDER BY 2 DESC, 1 LIMIT 10;
)SQL";

void prepare_git(const fs::path& work) {
  write_file(work / "README.md", "# demo\n\nA repository the real-binary test commits to.\n");
  InputGenerator gen(3);
  for (const char* name : {"src/main.c", "src/util.c", "src/old.c"}) {
    std::string code = "#include <stdio.h>\n\n";
    for (int f = 0; f < 200; ++f) {
      code += std::string("int ") + gen.word() + "_" + std::to_string(f) + "(int x) {\n  return x * " +
              std::to_string(gen.next(1000)) + " + " + std::to_string(gen.next(1000)) + ";\n}\n\n";
    }
    write_file(work / name, code);
  }
  std::string table = "id,word,value\n";
  for (int row = 0; row < 5000; ++row)
    table += std::to_string(row) + "," + gen.word() + "," + std::to_string(gen.next(100000)) + "\n";
  write_file(work / "data/table.csv", table);
}

std::vector<Workload> make_workloads() {
  std::vector<Workload> all;

  all.push_back({
      .name = "python",
      .program = "/usr/bin/python3",
      .environment = {"PYTHONHASHSEED=0", "PYTHONDONTWRITEBYTECODE=1"},
      .prepare = [](const fs::path& work) { write_file(work / "workload.py", kPythonScript); },
      .commands = {Command({"/usr/bin/python3", "workload.py"}).exits_with(3)},
      .check =
          [](const fs::path&, const std::vector<std::string>& outputs) {
            EXPECT_EQ(outputs[0].rfind("records 25000 json bytes ", 0), 0u) << outputs[0].substr(0, 200);
          },
  });

  all.push_back({
      .name = "sort",
      .program = "/usr/bin/sort",
      .environment = {},
      .prepare = [](const fs::path& work) { write_file(work / "lines.txt", sort_input()); },
      .commands =
          {
              Command({"/usr/bin/sort", "lines.txt"}),
              // A 1 MiB buffer: an external merge sort through temporary files.
              Command({"/usr/bin/sort", "-S", "1M", "--parallel=2", "-s", "-t", " ", "-k3,3n", "-k1,1",
                       "lines.txt"}),
              Command({"/usr/bin/sort", "-u", "-k4,4", "-k2,2r"}).input("lines.txt"),
          },
      .check =
          [](const fs::path& work, const std::vector<std::string>& outputs) {
            std::vector<std::string> lines = split_lines(read_file(work / "lines.txt"));
            std::sort(lines.begin(), lines.end());  // LC_ALL=C: byte order
            std::string expected;
            for (const std::string& line : lines) expected += line + '\n';
            EXPECT_TRUE(outputs[0] == expected) << "sort's output is not the sorted input";
            EXPECT_EQ(outputs[1].size(), expected.size());
          },
  });

  all.push_back({
      .name = "gzip",
      .program = "/usr/bin/gzip",
      .environment = {},
      .prepare = [](const fs::path& work) { write_file(work / "data.txt", gzip_input()); },
      .commands =
          {
              Command({"/usr/bin/gzip", "-c", "-n", "-6", "data.txt"}).save_output("data.txt.gz"),
              Command({"/usr/bin/gzip", "-d", "-c"}).input("data.txt.gz"),
              Command({"/usr/bin/gzip", "-c", "-n", "-9"}).input("data.txt"),
              Command({"/usr/bin/gzip", "-l", "data.txt.gz"}),
          },
      .check =
          [](const fs::path& work, const std::vector<std::string>& outputs) {
            const std::string original = read_file(work / "data.txt");
            EXPECT_LT(outputs[0].size(), original.size() / 2);
            EXPECT_TRUE(outputs[1] == original) << "the gzip round trip changed the data";
          },
  });

  const std::string git = "/usr/bin/git";
  all.push_back({
      .name = "git",
      .program = git,
      .environment = {"GIT_CONFIG_NOSYSTEM=1", "GIT_CONFIG_GLOBAL=/dev/null", "GIT_AUTHOR_NAME=Ada Author",
                      "GIT_AUTHOR_EMAIL=ada@example.com", "GIT_AUTHOR_DATE=1700000000 +0000",
                      "GIT_COMMITTER_NAME=Cy Committer", "GIT_COMMITTER_EMAIL=cy@example.com",
                      "GIT_COMMITTER_DATE=1700000100 +0000", "GIT_PAGER=cat", "GIT_TERMINAL_PROMPT=0"},
      .prepare = prepare_git,
      .commands =
          {
              Command({git, "init", "-q", "-b", "main"}),
              Command({git, "add", "README.md", "src"}),
              Command({git, "commit", "-q", "-m", "first: sources"}),
              Command({git, "add", "data"}),
              Command({git, "rm", "-q", "src/old.c"}),
              Command({git, "commit", "-q", "-m", "second: data, without old.c"}),
              // gc runs its own children (pack-refs, reflog, repack, pack-objects, prune).
              Command({git, "-c", "gc.autoDetach=false", "-c", "pack.threads=1", "gc", "-q"}),
              Command({git, "log", "--stat"}),
              Command({git, "cat-file", "-p", "HEAD"}),
              Command({git, "show", "--format=fuller", "HEAD"}),
              Command({git, "cat-file", "-p", "no-such-object"}).exits_with(128),
          },
      .check =
          [](const fs::path&, const std::vector<std::string>& outputs) {
            EXPECT_NE(outputs[7].find("second: data, without old.c"), std::string::npos) << outputs[7];
            EXPECT_NE(outputs[7].find("first: sources"), std::string::npos) << outputs[7];
            EXPECT_EQ(outputs[8].rfind("tree ", 0), 0u) << outputs[8];
          },
  });

  all.push_back({
      .name = "perl",
      .program = "/usr/bin/perl",
      .environment = {"PERL_HASH_SEED=0", "PERL_PERTURB_KEYS=0"},
      .prepare = [](const fs::path& work) { write_file(work / "workload.pl", kPerlScript); },
      .commands = {Command({"/usr/bin/perl", "workload.pl"})},
      .check =
          [](const fs::path&, const std::vector<std::string>& outputs) {
            EXPECT_GT(split_lines(outputs[0]).size(), 50u) << outputs[0];
          },
  });

  all.push_back({
      .name = "sqlite3",
      .program = "/usr/bin/sqlite3",
      .environment = {},
      .prepare = [](const fs::path& work) { write_file(work / "queries.sql", kSqliteScript); },
      .commands =
          {
              Command({"/usr/bin/sqlite3", "-batch", ":memory:"}).input("queries.sql"),
              Command({"/usr/bin/sqlite3", "-batch", ":memory:", "SELECT * FROM missing;"}).exits_with(1),
          },
      .check =
          [](const fs::path&, const std::vector<std::string>& outputs) {
            EXPECT_EQ(outputs[0].rfind("20000|", 0), 0u) << outputs[0].substr(0, 200);
          },
  });
  return all;
}

}  // namespace

const std::vector<Workload>& real_workloads() {
  static const std::vector<Workload> workloads = make_workloads();
  return workloads;
}

const Workload* find_workload(const std::string& name) {
  for (const Workload& workload : real_workloads())
    if (workload.name == name) return &workload;
  return nullptr;
}

}  // namespace hotpool::test

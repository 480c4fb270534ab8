#include "shim/options.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace hotpool::shim {
namespace {

struct Parsed {
  Options options;
  std::vector<std::string> warnings;
};

Parsed parse(std::vector<const char*> env) {
  env.push_back(nullptr);
  Parsed parsed;
  const unsigned count = parse_options(
      env.data(), &parsed.options,
      [](const char* line, void* context) { static_cast<Parsed*>(context)->warnings.push_back(line); },
      &parsed);
  EXPECT_EQ(count, parsed.warnings.size());
  return parsed;
}

TEST(Options, DefaultsComeFromTheTable) {
  const Parsed parsed = parse({"PATH=/usr/bin", "HOME=/root"});
  EXPECT_TRUE(parsed.warnings.empty());
  EXPECT_EQ(parsed.options.mode, Mode::Auto);
  EXPECT_STREQ(parsed.options.output, "");
  EXPECT_TRUE(parsed.options.report);
  EXPECT_FALSE(parsed.options.verbose);
  EXPECT_FALSE(parsed.options.help);
  EXPECT_EQ(parsed.options.classes.count, 0u);
  EXPECT_EQ(parsed.options.max_class, size_t{1} << 20);
}

TEST(Options, EveryDefaultParsesWithItsOwnParser) {
  // A default that does not parse would silently become a zero value.
  for (unsigned i = 0; i < option_count(); ++i) {
    const OptionInfo& info = option_info(i);
    const std::string entry = std::string(info.name) + "=" + info.default_text;
    const Parsed parsed = parse({entry.c_str()});
    EXPECT_TRUE(parsed.warnings.empty()) << info.name;
  }
}

TEST(Options, GoodValues) {
  const Parsed parsed = parse({"HOTPOOL_MODE=profile", "HOTPOOL_OUTPUT=/tmp/r.%p.json", "HOTPOOL_REPORT=no",
                               "HOTPOOL_VERBOSE=yes", "HOTPOOL_HELP=1", "HOTPOOL_CLASSES=48, 64,1K",
                               "HOTPOOL_MAX_CLASS=4M"});
  EXPECT_TRUE(parsed.warnings.empty());
  EXPECT_EQ(parsed.options.mode, Mode::Profile);
  EXPECT_STREQ(parsed.options.output, "/tmp/r.%p.json");
  EXPECT_FALSE(parsed.options.report);
  EXPECT_TRUE(parsed.options.verbose);
  EXPECT_TRUE(parsed.options.help);
  ASSERT_EQ(parsed.options.classes.count, 3u);
  EXPECT_EQ(parsed.options.classes.values[0], 48u);
  EXPECT_EQ(parsed.options.classes.values[1], 64u);
  EXPECT_EQ(parsed.options.classes.values[2], 1024u);
  EXPECT_EQ(parsed.options.max_class, size_t{4} << 20);
}

TEST(Options, ModesAreCaseInsensitiveAndTrimmed) {
  for (auto [text, mode] : std::vector<std::pair<const char*, Mode>>{
           {"off", Mode::Off}, {"OFF", Mode::Off}, {" Profile ", Mode::Profile}, {"fixed", Mode::Fixed},
           {"AUTO", Mode::Auto}}) {
    Mode parsed = Mode::Fixed == mode ? Mode::Off : Mode::Fixed;
    EXPECT_TRUE(parse_mode(text, &parsed)) << text;
    EXPECT_EQ(parsed, mode) << text;
  }
}

TEST(Options, BooleansAreForgiving) {
  for (const char* yes : {"1", "true", "TRUE", "yes", "on", "On", " y ", "enable"}) {
    bool value = false;
    EXPECT_TRUE(parse_bool(yes, &value)) << yes;
    EXPECT_TRUE(value) << yes;
  }
  for (const char* no : {"0", "false", "no", "OFF", "n", "disabled"}) {
    bool value = true;
    EXPECT_TRUE(parse_bool(no, &value)) << no;
    EXPECT_FALSE(value) << no;
  }
}

TEST(Options, SwitchesAreAutoOrABoolean) {
  EXPECT_EQ(parse({}).options.sites, Switch::Auto);
  for (auto [text, value] : std::vector<std::pair<const char*, Switch>>{
           {"auto", Switch::Auto}, {" AUTO ", Switch::Auto}, {"on", Switch::On}, {"1", Switch::On},
           {"yes", Switch::On}, {"off", Switch::Off}, {"0", Switch::Off}, {"False", Switch::Off}}) {
    Switch parsed = value == Switch::Off ? Switch::On : Switch::Off;
    EXPECT_TRUE(parse_switch(text, &parsed)) << text;
    EXPECT_EQ(parsed, value) << text;
  }
  Switch untouched = Switch::On;
  for (const char* bad : {"", "automatic", "maybe", "2"}) {
    EXPECT_FALSE(parse_switch(bad, &untouched)) << bad;
    EXPECT_EQ(untouched, Switch::On) << bad;
  }
  const Parsed parsed = parse({"HOTPOOL_SITES=sometimes"});
  ASSERT_EQ(parsed.warnings.size(), 1u);
  EXPECT_NE(parsed.warnings[0].find("HOTPOOL_SITES='sometimes' is not auto, or a boolean"), std::string::npos)
      << parsed.warnings[0];
  EXPECT_EQ(parsed.options.sites, Switch::Auto);
  EXPECT_STREQ(switch_name(Switch::Off), "off");
}

TEST(Options, SizeSuffixes) {
  const std::vector<std::pair<const char*, size_t>> cases = {
      {"0", 0}, {"64", 64}, {"64b", 64}, {"4K", 4096}, {"4k", 4096}, {"4KB", 4096}, {"4KiB", 4096},
      {"3M", size_t{3} << 20}, {"3mib", size_t{3} << 20}, {"2G", size_t{2} << 30}, {" 16 ", 16}};
  for (auto [text, expected] : cases) {
    size_t value = 1;
    EXPECT_TRUE(parse_size(text, &value)) << text;
    EXPECT_EQ(value, expected) << text;
  }
}

TEST(Options, SharesArePercentWithUpToFourDecimals) {
  const std::vector<std::pair<const char*, uint32_t>> cases = {
      {"1%", 10000},    {"1", 10000},       {"0.25%", 2500}, {" 0.25 % ", 2500}, {"100%", 1000000},
      {"0", 0},         {"0.0001%", 1},     {".5", 5000},    {"12.5%", 125000},  {"3.", 30000}};
  for (auto [text, expected] : cases) {
    uint32_t value = 7;
    EXPECT_TRUE(parse_share(text, &value)) << text;
    EXPECT_EQ(value, expected) << text;
  }
  uint32_t value = 7;
  for (const char* bad : {"", "%", ".", "-1%", "100.5%", "101", "1e-2", "0.00001%", "1%%", "1,5", "one"}) {
    EXPECT_FALSE(parse_share(bad, &value)) << bad;
    EXPECT_EQ(value, 7u) << bad;
  }
}

TEST(Options, HotShareFromTheEnvironmentAndItsFormat) {
  const char* env[] = {"HOTPOOL_HOT=0.25%", nullptr};
  Options options;
  EXPECT_EQ(parse_options(env, &options, nullptr, nullptr), 0u);
  EXPECT_EQ(options.hot_share, 2500u);
  for (unsigned i = 0; i < option_count(); ++i) {
    if (std::string(option_info(i).name) != "HOTPOOL_HOT") continue;
    char text[32];
    format_option_value(options, i, text, sizeof(text));
    EXPECT_STREQ(text, "0.25%");
    EXPECT_STREQ(option_info(i).type, "share");
    // Every share formats as the shortest text that parses back to it.
    const std::vector<std::pair<uint32_t, const char*>> formats = {
        {0, "0%"}, {1, "0.0001%"}, {50, "0.005%"}, {10000, "1%"}, {125000, "12.5%"}, {1000000, "100%"}};
    for (auto [ppm, expected] : formats) {
      Options other = options;
      other.hot_share = ppm;
      format_option_value(other, i, text, sizeof(text));
      EXPECT_STREQ(text, expected) << ppm;
      uint32_t back = 7;
      EXPECT_TRUE(parse_share(text, &back)) << text;
      EXPECT_EQ(back, ppm) << text;
    }
  }
  const char* bad[] = {"HOTPOOL_HOT=2x", nullptr};
  EXPECT_EQ(parse_options(bad, &options, nullptr, nullptr), 1u) << "one warning, and the default";
  EXPECT_EQ(options.hot_share, 10000u);
}

TEST(Options, DurationSuffixes) {
  const std::vector<std::pair<const char*, uint64_t>> cases = {
      {"0", 0},          {"250", 250000000ull}, {"250ms", 250000000ull}, {"10us", 10000ull},
      {"10\xc2\xb5s", 10000ull}, {"7ns", 7},       {"2s", 2000000000ull},  {" 3S ", 3000000000ull}};
  for (auto [text, expected] : cases) {
    uint64_t value = 1;
    EXPECT_TRUE(parse_duration(text, &value)) << text;
    EXPECT_EQ(value, expected) << text;
  }
  uint64_t value = 5;
  for (const char* bad : {"", "ms", "1.5s", "-1s", "3h", "10 ms", "99999999999999999999ns", "18446744073709551615s"}) {
    EXPECT_FALSE(parse_duration(bad, &value)) << bad;
    EXPECT_EQ(value, 5u) << bad;
  }
}

TEST(Options, MalformedValuesOfEveryKindLeaveTheValueUntouched) {
  size_t size = 7;
  for (const char* bad : {"", "K", "-1", "1.5K", "4X", "4KX", "12 34", "0x10", "99999999999999999999",
                          "17179869184G"}) {
    EXPECT_FALSE(parse_size(bad, &size)) << bad;
    EXPECT_EQ(size, 7u) << bad;
  }
  bool flag = true;
  for (const char* bad : {"", "maybe", "2", "yess", "onn"}) {
    EXPECT_FALSE(parse_bool(bad, &flag)) << bad;
    EXPECT_TRUE(flag);
  }
  Mode mode = Mode::Fixed;
  for (const char* bad : {"", "fast", "profiles", "of"}) {
    EXPECT_FALSE(parse_mode(bad, &mode)) << bad;
    EXPECT_EQ(mode, Mode::Fixed);
  }
  SizeList list{};
  list.count = 5;
  for (const char* bad : {"48,,64", "48,x", ",", "0", "48,0", "48;64"}) {
    EXPECT_FALSE(parse_size_list(bad, &list)) << bad;
    EXPECT_EQ(list.count, 5u) << bad;
  }
}

TEST(Options, SizeListLimit) {
  std::string many;
  for (int i = 1; i <= 127; ++i) many += std::to_string(i * 16) + (i < 127 ? "," : "");
  SizeList list{};
  EXPECT_FALSE(parse_size_list(many.c_str(), &list));
  many = many.substr(0, many.rfind(','));  // 126 entries fit
  EXPECT_TRUE(parse_size_list(many.c_str(), &list));
  EXPECT_EQ(list.count, 126u);
}

TEST(Options, BadValueWarnsOnceAndKeepsTheDefault) {
  const Parsed parsed = parse({"HOTPOOL_MODE=fast", "HOTPOOL_MAX_CLASS=lots", "HOTPOOL_REPORT=perhaps"});
  ASSERT_EQ(parsed.warnings.size(), 3u);
  EXPECT_EQ(parsed.warnings[0],
            "hotpool: HOTPOOL_MODE='fast' is not one of off, profile, fixed, auto; using the default 'auto'");
  EXPECT_NE(parsed.warnings[1].find("HOTPOOL_MAX_CLASS='lots'"), std::string::npos);
  EXPECT_NE(parsed.warnings[2].find("using the default 'on'"), std::string::npos);
  EXPECT_EQ(parsed.options.mode, Mode::Auto);
  EXPECT_EQ(parsed.options.max_class, size_t{1} << 20);
  EXPECT_TRUE(parsed.options.report);
  for (const std::string& line : parsed.warnings) {
    EXPECT_EQ(line.rfind("hotpool: ", 0), 0u);
    EXPECT_EQ(line.find('\n'), std::string::npos);
  }
}

TEST(Options, UnknownNamesAreWarnedAboutButNotPrefixLookalikes) {
  const Parsed parsed = parse({"HOTPOOL_MODES=off", "HOTPOOL_=1", "HOTPOOLMODE=off", "XHOTPOOL_MODE=off",
                               "HOTPOOL_MOD=profile"});
  ASSERT_EQ(parsed.warnings.size(), 3u);
  EXPECT_EQ(parsed.warnings[0], "hotpool: unknown option HOTPOOL_MODES ignored (HOTPOOL_HELP=1 lists the options)");
  EXPECT_NE(parsed.warnings[1].find("HOTPOOL_ "), std::string::npos);
  EXPECT_NE(parsed.warnings[2].find("HOTPOOL_MOD "), std::string::npos);
  EXPECT_EQ(parsed.options.mode, Mode::Auto);
}

TEST(Options, OverlongValuesAreRejectedNotTruncated) {
  const std::string path = "HOTPOOL_OUTPUT=/tmp/" + std::string(600, 'x');
  const Parsed parsed = parse({path.c_str()});
  ASSERT_EQ(parsed.warnings.size(), 1u);
  EXPECT_STREQ(parsed.options.output, "");
  // The warning line itself stays one bounded line.
  EXPECT_LT(parsed.warnings[0].size(), 512u);
}

TEST(Options, LaterDuplicatesWin) {
  const Parsed parsed = parse({"HOTPOOL_MODE=profile", "HOTPOOL_MODE=off"});
  EXPECT_TRUE(parsed.warnings.empty());
  EXPECT_EQ(parsed.options.mode, Mode::Off);
}

TEST(Options, FormattedValuesParseBackToTheSameOptions) {
  const Parsed parsed = parse({"HOTPOOL_MODE=fixed", "HOTPOOL_CLASSES=48,64,1024,3M", "HOTPOOL_MAX_CLASS=65536",
                               "HOTPOOL_OUTPUT=out.json", "HOTPOOL_SITES=off"});
  std::vector<std::string> round_trip;
  for (unsigned i = 0; i < option_count(); ++i) {
    char value[600];
    format_option_value(parsed.options, i, value, sizeof(value));
    round_trip.push_back(std::string(option_info(i).name) + "=" + value);
  }
  std::vector<const char*> env;
  for (const std::string& entry : round_trip) env.push_back(entry.c_str());
  const Parsed again = parse(env);
  EXPECT_TRUE(again.warnings.empty());
  EXPECT_EQ(again.options.mode, Mode::Fixed);
  EXPECT_STREQ(again.options.output, "out.json");
  EXPECT_EQ(again.options.max_class, 65536u);
  EXPECT_EQ(again.options.sites, Switch::Off);
  ASSERT_EQ(again.options.classes.count, 4u);
  EXPECT_EQ(again.options.classes.values[3], size_t{3} << 20);
  EXPECT_EQ(round_trip[option_count() - 1], "HOTPOOL_MAX_CLASS=64K");
}

}  // namespace
}  // namespace hotpool::shim

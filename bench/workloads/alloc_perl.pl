# Workload "perl" of suite alloc: allocation-heavy Perl. Builds records as
# hashes of strings and arrays, sorts them, joins them into one text,
# counts its numbers in a hash and rewrites strings with regexes.
# Deterministic with PERL_HASH_SEED=0 and PERL_PERTURB_KEYS=0 (scripts/bench
# sets both), and every hash is read in sorted order anyway.
#
#   perl alloc_perl.pl [RECORDS = 80000]
use strict;
use warnings;

my $count = shift // 80000;
my (%by_key, @records);
for my $i (0 .. $count - 1) {
    my $name = join('-', 'rec', $i * 7919 % 100003, ('x' x ($i % 40)));
    my %record = (id => $i, name => $name, fields => [split /-/, $name], score => ($i * 31) % 977);
    push @records, \%record;
    push @{ $by_key{ $i % 211 } }, $name;
}
my @sorted = sort { $a->{score} <=> $b->{score} or $a->{name} cmp $b->{name} } @records;
my $text = join("\n", map { "$_->{id}\t$_->{name}\t$_->{score}" } @sorted);
my %numbers;
$numbers{$_}++ for ($text =~ /(\d+)/g);
my $total = 0;
for my $key (sort { $a <=> $b } keys %by_key) {
    my $joined = join(',', sort @{ $by_key{$key} });
    (my $squeezed = $joined) =~ s/x+/x/g;
    $total += length($squeezed);
}
printf "%d %d %d %d\n", scalar(@sorted), length($text), scalar(keys %numbers), $total;
print join(' ', map { $_->{id} } @sorted[0 .. 9]), "\n";

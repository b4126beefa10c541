//! Topics: MQTT-style filters (`+`, `#`) and the productKey / deviceName in Aliyun's topic shapes.

/// A topic filter with MQTT wildcards: `+` matches one level, `#` (last) matches the rest,
/// including nothing. Levels are separated by `/`; Aliyun topics start with `/`, so their
/// first level is empty (`/+/+/thing/event/property/post` matches every property post).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter {
    pattern: String,
}

impl TopicFilter {
    /// Checks the pattern: `#` only as a whole last level, `+` only as a whole level.
    pub fn new(pattern: &str) -> Result<Self, String> {
        if pattern.is_empty() {
            return Err("a topic filter must not be empty".into());
        }
        let levels: Vec<&str> = pattern.split('/').collect();
        for (i, level) in levels.iter().enumerate() {
            if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
                return Err(format!(
                    "`{pattern}`: `#` must be a whole level and the last one"
                ));
            }
            if level.contains('+') && *level != "+" {
                return Err(format!("`{pattern}`: `+` must be a whole level"));
            }
        }
        Ok(TopicFilter {
            pattern: pattern.to_string(),
        })
    }

    /// Whether `topic` matches.
    pub fn matches(&self, topic: &str) -> bool {
        let mut pattern = self.pattern.split('/');
        let mut topic = topic.split('/');
        loop {
            match (pattern.next(), topic.next()) {
                (Some("#"), _) => return true,
                (Some("+"), Some(_)) => {}
                (Some(p), Some(t)) if p == t => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}

/// Include and exclude filters: a topic passes when it matches an include (or there are none)
/// and matches no exclude.
#[derive(Debug, Clone, Default)]
pub struct TopicFilters {
    /// `--topic`.
    pub include: Vec<TopicFilter>,
    /// `--exclude-topic`.
    pub exclude: Vec<TopicFilter>,
}

impl TopicFilters {
    /// Whether a message on `topic` goes to the output.
    pub fn passes(&self, topic: &str) -> bool {
        (self.include.is_empty() || self.include.iter().any(|f| f.matches(topic)))
            && !self.exclude.iter().any(|f| f.matches(topic))
    }

    /// No filters at all (the fast path).
    pub fn is_empty(&self) -> bool {
        self.include.is_empty() && self.exclude.is_empty()
    }
}

/// The productKey and deviceName an Aliyun topic names, when it names them:
/// `/as/mqtt/status/{pk}/{dn}`, `/sys/{pk}/{dn}/...`, `/{pk}/{packageId}/{jobId}/ota/job/status`
/// (product only), and `/{pk}/{dn}/...` for the thing, user, ota and other device topics.
pub fn device_of(topic: &str) -> (Option<&str>, Option<&str>) {
    let Some(rest) = topic.strip_prefix('/') else {
        return (None, None);
    };
    // The shapes below look at the first six levels at most; `count` is the real number.
    // Split by hand: this runs for every message, and a `Vec` of levels was most of its cost.
    let mut levels = [""; 6];
    let mut count = 0usize;
    let mut start = 0usize;
    for (i, byte) in rest.bytes().enumerate() {
        if byte == b'/' {
            if count < levels.len() {
                levels[count] = &rest[start..i];
            }
            count += 1;
            start = i + 1;
        }
    }
    if count < levels.len() {
        levels[count] = &rest[start..];
    }
    count += 1;
    fn non_empty(s: &str) -> Option<&str> {
        (!s.is_empty()).then_some(s)
    }
    match &levels[..count.min(levels.len())] {
        ["as", "mqtt", "status", pk, dn, ..] => (non_empty(pk), non_empty(dn)),
        ["sys", pk, dn, _, ..] => (non_empty(pk), non_empty(dn)),
        [pk, _, _, "ota", "job", "status"] if count == 6 => (non_empty(pk), None),
        [pk, dn, _, ..] => (non_empty(pk), non_empty(dn)),
        _ => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(p: &str) -> TopicFilter {
        TopicFilter::new(p).unwrap()
    }

    #[test]
    fn mqtt_wildcards() {
        let t = "/a1/dev1/thing/event/property/post";
        assert!(f("/a1/dev1/thing/event/property/post").matches(t));
        assert!(f("/+/+/thing/event/property/post").matches(t));
        assert!(f("/a1/#").matches(t));
        assert!(f("#").matches(t));
        assert!(
            f("/a1/dev1/thing/event/property/post/#").matches(t),
            "# matches nothing too"
        );
        assert!(!f("/a1/+/thing").matches(t));
        assert!(!f("/a2/#").matches(t));
        assert!(!f("/+/+/thing/event/+/post/x").matches(t));
        assert!(f("/as/mqtt/status/+/+").matches("/as/mqtt/status/a1/d"));
        assert!(!f("/as/mqtt/status/+").matches("/as/mqtt/status/a1/d"));
        assert!(TopicFilter::new("/a/#/b").is_err());
        assert!(TopicFilter::new("/a/b#").is_err());
        assert!(TopicFilter::new("/a+/b").is_err());
        assert!(TopicFilter::new("").is_err());
    }

    #[test]
    fn include_and_exclude() {
        let filters = TopicFilters {
            include: vec![f("/a1/#")],
            exclude: vec![f("/+/+/user/#")],
        };
        assert!(filters.passes("/a1/d/thing/event/property/post"));
        assert!(!filters.passes("/a1/d/user/raw"));
        assert!(!filters.passes("/a2/d/thing/event/property/post"));
        assert!(TopicFilters::default().passes("anything"));
    }

    #[test]
    fn devices_in_topic_shapes() {
        assert_eq!(
            device_of("/a1/dev1/thing/event/property/post"),
            (Some("a1"), Some("dev1"))
        );
        assert_eq!(
            device_of("/as/mqtt/status/a1/dev1"),
            (Some("a1"), Some("dev1"))
        );
        assert_eq!(
            device_of("/sys/a1/dev1/thing/event/property/post"),
            (Some("a1"), Some("dev1"))
        );
        assert_eq!(device_of("/a1/dev1/user/a/b"), (Some("a1"), Some("dev1")));
        assert_eq!(
            device_of("/a1/dev1/thing/lifecycle"),
            (Some("a1"), Some("dev1"))
        );
        assert_eq!(
            device_of("/a1/pkg9/job7/ota/job/status"),
            (Some("a1"), None)
        );
        assert_eq!(
            device_of("/a1/dev1/ota/upgrade"),
            (Some("a1"), Some("dev1"))
        );
        assert_eq!(device_of("/a1"), (None, None));
        assert_eq!(device_of("/"), (None, None));
        assert_eq!(device_of("//x/y"), (None, Some("x")));
        // Seven levels: not the OTA job shape, which has exactly six.
        assert_eq!(
            device_of("/a1/pkg9/job7/ota/job/status/x"),
            (Some("a1"), Some("pkg9"))
        );
        assert_eq!(device_of("a1/dev1/x"), (None, None));
        assert_eq!(device_of("//dev/x"), (None, Some("dev")));
    }
}
